"""Hand-made tables for the words captions use most, where WordNet's general-purpose hierarchy gives wrong answers.

Read one by one, WordNet-only negatives failed in a few recurring ways (issue 11): the first sense of a frequent
caption noun is not the one captions mean ("plate" -> home plate -> "second base", "people" -> a group ->
"knowledges"); co-hyponyms of person nouns are often still true of the picture ("man" -> "reporter"); verbs'
co-hyponyms change the frame ("standing" -> "rising", "docked" -> "penetrated") and antonyms give one stiff phrase
("hold" -> "let go of"); adjective co-hyponyms through derived nouns stray from the attribute ("green" -> "pale").
The tables below fix those for the caption vocabulary; everything else still comes from WordNet (lexicon.py),
restricted to the same concrete lexicographer file.

- SENSE_OVERRIDES: noun -> the WordNet synset captions mean.
- PERSON_GROUPS: person nouns replace each other only inside a group (gender and age; sports roles); a person
  noun outside every group ("reporter", "tourist") gets no candidate, since another role is rarely false.
- ADJECTIVE_CLASSES and ADJECTIVE_OPPOSITES: colours replace colours; size, age, state... replace only by their
  opposites. An adjective outside both tables takes WordNet's direct antonyms only.
- VERB_FRAMES: a verb's replacements, each of the same frame (posture verbs among themselves, transitive stays
  transitive with an object it plausibly takes); verbs outside the table are not replaced.
- NOT_ADJECTIVES: quantifiers spaCy tags JJ ("several", "many"): never an attribute, never swapped.
- PLACE_NOUNS: grounds and rooms. A spatial preposition before one of them ("on a beach", "in a kitchen") is not
  replaced ("under a beach" is no scene), and two entities are swapped only when neither is a place.
"""
from __future__ import annotations

# Synset names per lemma; checked against WordNet 3.0 (tests/test_negatives_lexicon.py).
SENSE_OVERRIDES: dict[str, str] = {
    "person": "person.n.01", "people": "person.n.01", "table": "table.n.02", "plate": "plate.n.04",
    "bear": "bear.n.01", "bat": "bat.n.05", "mouse": "mouse.n.04", "glass": "glass.n.02", "board": "board.n.03",
    "court": "court.n.04", "kite": "kite.n.03", "sign": "signboard.n.01", "phone": "telephone.n.01",
    "cell_phone": "cellular_telephone.n.01", "bowl": "bowl.n.03", "monitor": "monitor.n.04",
    "remote": "remote_control.n.01", "screen": "screen.n.01", "counter": "counter.n.01", "cabinet": "cabinet.n.01",
    "tie": "necktie.n.01", "pole": "pole.n.01", "post": "post.n.04", "bench": "bench.n.01", "seat": "seat.n.03",
    "box": "box.n.01", "cup": "cup.n.01", "suit": "suit.n.01", "slice": "slice.n.02", "piece": "piece.n.08",
    "shelf": "shelf.n.01", "toilet": "toilet.n.02", "stove": "stove.n.01", "oven": "oven.n.01", "sink": "sink.n.01",
    "pan": "pan.n.01", "truck": "truck.n.01", "train": "train.n.01", "car": "car.n.01", "bus": "bus.n.01",
    "computer": "computer.n.01", "keyboard": "computer_keyboard.n.01", "orange": "orange.n.01",
    "apple": "apple.n.01", "sandwich": "sandwich.n.01", "donut": "doughnut.n.02", "hot_dog": "hotdog.n.02",
    "bag": "bag.n.01", "racket": "racket.n.04", "ball": "ball.n.01", "chair": "chair.n.01", "couch": "sofa.n.01",
    "bed": "bed.n.01", "desk": "desk.n.01", "laptop": "laptop.n.01", "umbrella": "umbrella.n.01",
    "clock": "clock.n.01", "vase": "vase.n.01", "book": "book.n.02", "cake": "cake.n.03", "pizza": "pizza.n.01",
    "dog": "dog.n.01", "cat": "cat.n.01", "horse": "horse.n.01", "sheep": "sheep.n.01", "cow": "cow.n.01",
    "bird": "bird.n.01", "elephant": "elephant.n.01", "zebra": "zebra.n.01", "giraffe": "giraffe.n.01",
    "hat": "hat.n.01", "mustard": "mustard.n.02", "shirt": "shirt.n.01", "tree": "tree.n.01", "flower": "flower.n.01",
}

PERSON_GROUPS: tuple[tuple[str, ...], ...] = (
    ("man", "woman", "boy", "girl", "child", "baby", "lady", "guy", "kid", "gentleman", "old man", "old woman",
     "young man", "young woman", "little boy", "little girl", "teenager", "adult", "mother", "father"),
    ("skier", "snowboarder", "surfer", "skateboarder", "cyclist", "swimmer", "runner", "biker"),
    ("tennis player", "baseball player", "soccer player", "football player", "basketball player", "golfer"),
    ("chef", "waiter", "doctor", "nurse", "police officer", "soldier", "farmer", "student", "teacher"),
    ("bride", "groom"),
)
# (gender, age) of the first group: a replacement must differ in a way the picture shows. "boy" -> "child" is a
# hypernym, "man" -> "old man" may still be true; "" is either gender, "adult" includes "young" and "old".
PERSON_TRAITS: dict[str, tuple[str, str]] = {
    "man": ("m", "adult"), "woman": ("f", "adult"), "lady": ("f", "adult"), "guy": ("m", "adult"),
    "gentleman": ("m", "adult"), "old man": ("m", "old"), "old woman": ("f", "old"), "young man": ("m", "young"),
    "young woman": ("f", "young"), "boy": ("m", "kid"), "girl": ("f", "kid"), "little boy": ("m", "kid"),
    "little girl": ("f", "kid"), "child": ("", "kid"), "kid": ("", "kid"), "baby": ("", "baby"),
    "teenager": ("", "teen"), "adult": ("", "adult"), "mother": ("f", "adult"), "father": ("m", "adult"),
}


def persons_differ(a: str, b: str) -> bool:
    """Whether person noun `b` is false of a picture of `a` (both in PERSON_TRAITS; other groups: always)."""
    if "baby" in (a, b):
        return False  # a baby's scenes (a crib, arms holding it) are no scene for anyone else
    if a not in PERSON_TRAITS or b not in PERSON_TRAITS:
        return True
    (ga, aa), (gb, ab) = PERSON_TRAITS[a], PERSON_TRAITS[b]
    if ga and gb and ga != gb:
        return True
    ages = {aa, ab}
    return aa != ab and ages not in ({"adult", "young"}, {"adult", "old"})


# Nouns whose plural spells like the singular: spaCy often tags "a herd of sheep" NN, and a replacement would
# then stay singular ("a herd of horse"); they are not replaced.
INVARIANT_PLURALS = frozenset({"sheep", "deer", "fish", "moose", "bison", "salmon", "aircraft", "series"})
# Adjective + noun pairs that name one thing ("hot dog"): the adjective is part of the noun, not an attribute.
FIXED_COMPOUNDS = frozenset({"hot dog", "teddy bear", "double decker", "stuffed animal", "flat screen",
                             "french fries", "ice cream", "cell phone", "high chair", "living room", "hot tub",
                             "traffic light", "red light", "green light", "white house", "solar panel"})
SIZE_ADJECTIVES = frozenset({"large", "big", "huge", "giant", "small", "little", "tiny", "tall", "short", "long"})

COLOURS = ("red", "blue", "green", "white", "black", "yellow", "brown", "orange", "pink", "gray", "purple",
           "silver", "gold", "beige", "tan")
SPELLINGS = {"grey": "gray", "colour": "color"}  # one spelling stands for both in the tables
ADJECTIVE_CLASSES: tuple[tuple[str, ...], ...] = (
    COLOURS,
    ("wooden", "metal", "plastic", "stone", "brick", "glass", "leather"),
)
# Near-synonyms (grey/gray, big/large) never replace each other: each word lists what it may become.
ADJECTIVE_OPPOSITES: dict[str, tuple[str, ...]] = {
    "large": ("small", "tiny"), "big": ("small", "little", "tiny"), "huge": ("small", "tiny"),
    "giant": ("small", "tiny"), "small": ("large", "big", "huge"), "little": ("big", "large"),
    "tiny": ("large", "big", "huge"), "tall": ("short", "small"), "short": ("tall", "long"), "long": ("short",),
    "young": ("old",), "old": ("young", "new"), "new": ("old",), "empty": ("full", "crowded"),
    "full": ("empty",), "open": ("closed",), "closed": ("open",), "clean": ("dirty", "messy"),
    "dirty": ("clean",), "messy": ("clean", "tidy"), "wet": ("dry",), "dry": ("wet",), "hot": ("cold",),
    "cold": ("hot", "warm"), "warm": ("cold",), "busy": ("empty", "quiet"), "crowded": ("empty",),
    "dark": ("bright",), "bright": ("dark",), "calm": ("rough",), "rough": ("calm",),
    "wide": ("narrow",), "narrow": ("wide",), "thick": ("thin",), "thin": ("thick",), "fat": ("thin",),
    "high": ("low",), "low": ("high",), "modern": ("old", "antique"), "antique": ("modern",),
    "shallow": ("deep",), "deep": ("shallow",), "fresh": ("rotten",), "ripe": ("unripe", "green"),
    "happy": ("sad",), "sad": ("happy",), "smiling": ("frowning",), "steep": ("flat", "gentle"), "flat": ("steep",),
    "snowy": ("grassy", "sandy"), "grassy": ("snowy", "sandy"), "sandy": ("grassy", "snowy", "rocky"),
    "rocky": ("sandy", "grassy"), "dusty": ("muddy", "grassy"), "muddy": ("dusty", "grassy"),
    "windy": ("calm",), "sunny": ("cloudy",), "cloudy": ("sunny", "clear"), "rainy": ("sunny",),
    "foggy": ("sunny", "clear"), "clear": ("cloudy",), "paved": ("dirt",), "stuffed": ("live",),
    "double": ("single",), "single": ("double",),
    "paper": ("plastic", "wooden"), "cardboard": ("wooden", "plastic", "metal"), "concrete": ("wooden", "metal"),
    "male": ("female",), "female": ("male",), "asleep": ("awake",), "awake": ("asleep",),
}

# lemma -> replacements, every one of the same frame as the lemma (and, for transitive verbs, taking the same kind
# of object); "lie" and "lay" both appear because captions use "laying" for "lying".
VERB_FRAMES: dict[str, tuple[str, ...]] = {
    "sit": ("stand", "lie", "kneel"), "stand": ("sit", "lie", "kneel"), "lie": ("sit", "stand"),
    "lay": ("sit", "stand"), "kneel": ("sit", "stand"), "squat": ("stand", "sit"),
    "walk": ("run",), "run": ("walk",), "hold": ("throw", "drop"), "carry": ("drop", "throw", "push"),
    "throw": ("catch", "hold", "kick"), "catch": ("throw", "drop", "kick"), "kick": ("throw", "catch", "hold"),
    "drop": ("catch", "hold"), "push": ("pull", "carry"), "pull": ("push", "carry"), "ride": ("lead", "push"),
    "wear": ("hold", "carry"), "eat": ("cut",), "cut": ("eat",), "hit": ("miss", "catch"),
    "miss": ("hit",), "swing": ("throw", "drop"), "open": ("close",), "close": ("open",),
    "feed": ("pet",), "pet": ("feed",), "chase": ("feed", "follow"), "follow": ("chase",),
    "hug": ("push", "chase"), "fly": ("hold", "carry"), "enter": ("leave",), "leave": ("enter",),
    "climb": ("descend",), "board": ("leave",),
    "drink": ("spill", "pour"), "read": ("write",), "write": ("read",), "buy": ("sell",), "sell": ("buy",),
    "chew": ("lick", "hold"), "lick": ("chew",), "watch": ("ignore",), "kiss": ("push",), "touch": ("kick",),
}
# Verbs whose replacements need a direct object (the others also work without one).
TRANSITIVE = frozenset({"hold", "carry", "throw", "catch", "kick", "drop", "push", "pull", "ride", "wear", "eat",
                        "cut", "hit", "miss", "swing", "open", "close", "feed", "pet", "chase", "follow", "hug",
                        "fly", "enter", "leave", "board", "brush", "wash", "cook", "drink", "chew", "lick", "read",
                        "write", "buy", "sell", "kiss", "touch", "watch", "climb"})
INTRANSITIVE_OK = frozenset({"sit", "stand", "lie", "lay", "kneel", "squat", "walk", "run"})

NOT_ADJECTIVES = frozenset("several many few numerous various other multiple different same whole own such much "
                           "more most last next first second third only certain entire several_other "
                           "top bottom front back left right middle main".split())

PLACE_NOUNS = frozenset(
    "beach field street road sidewalk grass snow water ocean sea lake river pond air sky ground floor room kitchen "
    "bathroom bedroom office restaurant city town park yard backyard farm barn forest woods hill hillside mountain "
    "slope track court runway highway intersection corner lot parking_lot station airport platform rain shade "
    "sun night day area building house home school church store market shop zoo pasture meadow desert sand "
    "background foreground distance middle side top bottom front back edge center crowd world way air "
    "living_room dining_room city_street country_road dirt_road".split())

# Everyday things by category: a noun is replaced by another of its category. Words outside these lists join
# a category through WordNet (CATEGORY_ANCHORS: the first anchor among the hypernyms of the caption sense); a
# corpus vocabulary adds its own words the same way.
NOUN_GROUPS: dict[str, tuple[str, ...]] = {
    "bird": ("bird", "duck", "pigeon", "seagull", "goose", "swan", "parrot", "owl", "eagle", "crow"),
    "pet": ("dog", "cat", "puppy", "kitten"),
    "small animal": ("rabbit", "squirrel", "fox", "raccoon"),
    "mount": ("horse", "donkey", "camel", "elephant"),
    "livestock": ("cow", "sheep", "goat", "pig", "bull"),
    "wild animal": ("giraffe", "zebra", "bear", "lion", "tiger", "deer", "monkey"),
    "road vehicle": ("car", "bus", "truck", "van", "taxi", "jeep", "tractor"),
    "two-wheeler": ("bicycle", "motorcycle", "scooter"),
    "rail vehicle": ("train", "tram", "subway"),
    "cart": ("cart", "wagon", "carriage"),
    "boat": ("boat", "ship", "canoe", "kayak", "sailboat", "yacht"),
    "aircraft": ("airplane", "helicopter", "jet", "glider"),
    "seat": ("chair", "couch", "bench", "stool", "armchair"),
    "table": ("table", "desk"),
    "bed": ("bed", "crib"),
    "storage": ("shelf", "cabinet", "dresser", "bookcase"),
    # count foods and mass foods apart: "a rice", "a piece of egg" are no English
    "food": ("pizza", "sandwich", "cake", "donut", "hot dog", "banana", "apple", "orange", "carrot", "cookie",
             "hamburger", "egg", "pie", "steak", "potato", "tomato", "sausage", "muffin", "onion", "bagel"),
    "mass food": ("broccoli", "salad", "soup", "bread", "cheese", "rice", "pasta", "meat", "chicken", "fish",
                  "cereal", "spaghetti"),
    "condiment": ("mustard", "ketchup", "mayonnaise", "relish"),
    "drink": ("wine", "beer", "coffee", "tea", "juice", "milk", "soda", "lemonade"),
    "plate": ("plate", "tray", "platter"),
    "bowl": ("bowl", "pot", "pan"),
    "drinkware": ("cup", "glass", "mug", "bottle", "jar", "pitcher"),
    "luggage": ("bag", "suitcase", "backpack", "box", "basket", "bucket", "purse"),
    "clothing": ("shirt", "hat", "jacket", "dress", "tie", "cap", "coat", "helmet", "scarf", "sweater", "skirt",
                 "suit", "uniform", "vest", "hoodie", "apron"),
    "throwable": ("ball", "frisbee"),
    "board": ("skateboard", "surfboard", "snowboard", "ski", "sled"),
    "racket": ("racket", "bat", "golf club"),
    "electronics": ("laptop", "computer", "phone", "cell phone", "television", "monitor", "keyboard", "mouse",
                    "remote", "camera", "tablet", "radio"),
    "kitchen appliance": ("refrigerator", "stove", "oven", "microwave", "dishwasher", "toaster"),
    "bathroom fixture": ("toilet", "sink", "bathtub", "shower"),
    "plant": ("tree", "bush", "palm tree"),
    "flower": ("rose", "tulip", "sunflower", "daisy"),
    "street": ("fire hydrant", "stop sign", "traffic light", "parking meter", "mailbox", "street lamp",
               "trash can"),
    "textile": ("pillow", "blanket", "towel", "rug", "curtain"),
    "wall decor": ("clock", "mirror", "painting", "poster"),
    "table decor": ("lamp", "vase"),
    "reading": ("book", "newspaper", "magazine"),
    "toy": ("teddy bear", "doll", "stuffed animal"),
    "opening": ("window", "door", "gate"),
    "tool": ("scissors", "knife", "pen", "toothbrush", "hammer"),
    "shape": ("circle", "square", "triangle", "cross", "rectangle", "star", "heart", "diamond"),
}
# Generic nouns whose own category holds only their kinds ("bird": pigeon, duck): candidates come from a
# neighbouring category instead ("a bird on a fence" -> "a cat on a fence").
GENERIC_NOUNS = {"bird": "pet", "animal": "pet", "vehicle": "road vehicle", "food": "drink"}
# (synset, category), most specific first.
CATEGORY_ANCHORS: tuple[tuple[str, str], ...] = (
    ("bicycle.n.01", "two-wheeler"), ("motorcycle.n.01", "two-wheeler"), ("car.n.01", "road vehicle"),
    ("truck.n.01", "road vehicle"), ("bus.n.01", "road vehicle"), ("wagon.n.01", "cart"), ("vessel.n.02", "boat"),
    ("aircraft.n.01", "aircraft"), ("seat.n.03", "seat"), ("table.n.02", "table"), ("bed.n.01", "bed"),
    ("beverage.n.01", "drink"), ("flower.n.01", "flower"), ("tree.n.01", "plant"), ("bird.n.01", "bird"),
    ("ungulate.n.01", "wild animal"), ("headdress.n.01", "clothing"), ("clothing.n.01", "clothing"),
    ("bag.n.01", "luggage"),
)

# Colours animals have: "a blue horse" is no scene.
ANIMAL_COLOURS = ("black", "white", "brown", "gray")
ANIMAL_GROUPS = frozenset({"bird", "pet", "small animal", "mount", "livestock", "wild animal"})
KID_NOUNS = frozenset({"boy", "girl", "child", "kid", "baby", "little boy", "little girl", "toddler", "son",
                       "daughter"})
# Posture verbs by subject: birds perch (sit/stand are one thing for them), hoofed animals stand or lie.
NO_POSTURE_CHANGE = frozenset({"bird"})
NO_SITTING = frozenset({"mount", "livestock", "wild animal"})
POSTURE_VERBS = frozenset({"sit", "stand", "lie", "lay", "kneel", "squat"})
# Handling verbs whose replacements ("throw", "drop") make no scene with a person, an animal or food as object.
HANDLING_VERBS = frozenset({"hold", "carry", "catch"})


def person_gender(word: str) -> str:
    """'m', 'f' or '' (either, or not a person noun of PERSON_TRAITS)."""
    return PERSON_TRAITS.get(word, ("", ""))[0]

# A word before a person noun that fixes its age: "an old man" -> "an old boy" is no English.
AGE_WORDS = {"old": "adult", "elderly": "adult", "little": "kid", "young": ""}
# Pairs where one names a kind of the other in everyday speech (WordNet files them apart): never replacements.
SAME_THING = frozenset({("dog", "puppy"), ("cat", "kitten"), ("flower", "rose"), ("cow", "bull"),
                        ("boat", "sailboat"), ("boat", "yacht"), ("boat", "canoe"), ("boat", "kayak"),
                        ("airplane", "jet"), ("airplane", "glider"), ("couch", "sofa bed"), ("chair", "armchair"),
                        ("car", "taxi"), ("car", "jeep"), ("bag", "purse"), ("bag", "backpack"), ("cup", "mug"),
                        ("computer", "laptop"), ("phone", "cell phone"), ("ball", "frisbee")})
SAME_THING_OF = {w: {b for a, b in SAME_THING if a == w} | {a for a, b in SAME_THING if b == w}
                 for pair in SAME_THING for w in pair}
# Groups whose nouns head "a <noun> of <content>" ("a bowl of soup"); other heads of such a phrase keep their word.
CONTAINER_GROUPS = frozenset({"plate", "bowl", "drinkware", "luggage"})
# Objects something can be under: "a vase under a table", not "a pizza under a tray".
UNDER_GROUPS = frozenset({"seat", "table", "bed", "storage", "road vehicle", "rail vehicle", "cart"})
# "talking on a phone", "playing on a laptop": "on" after these verbs is no place.
NON_SPATIAL_ON = frozenset({"talk", "play", "work", "type", "chat", "speak", "write", "draw"})
