#!/usr/bin/env bash
# Pack what GPU calls carry into .peer/ (git-ignored through .git/info/exclude), each part
# under the device tool's 64 MiB per call. See docs/device.md for the call sequence.
#
#   bash scripts/pack_device_carry.sh [BASE_COMMIT]   # BASE: a before/after comparison
#
#   .peer/p1 p2 p3   vLLM 0.24.0 peer bundle (../shared/peer), three calls back to back
#   .peer/g1 g2      the default model's GGUF (SmolLM2-135M, 98 MB) in two halves
#   .peer/w          wheels the GPU image lacks for structured outputs: xgrammar, jsonschema,
#                    pydantic and their dependencies (from the peer bundle's wheels)
#   .peer/w2         the gguf package (transformers reads GGUF with it), from this venv
#   .peer/snap.tar   HEAD's src/ scripts/ tests/ pyproject.toml: run from it on the device,
#                    so uncommitted edits in this tree never reach a measurement
#   .peer/old_src.tar  BASE's src/, when given
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.peer/" .git/info/exclude 2>/dev/null || echo /.peer/ >> .git/info/exclude
P=.peer
PEER=${PEER_DIR:-../shared/peer}
mkdir -p "$P"/g1 "$P"/g2 "$P"/w "$P"/w2
if [[ -d $PEER ]]; then cp -r "$PEER"/p1 "$PEER"/p2 "$PEER"/p3 "$P"/; fi
GGUF=$(python3 -c "from tachyon.loader.resolve import default_gguf_path; print(default_gguf_path())")
tmp=$(mktemp -d); split -n 2 -d "$GGUF" "$tmp/gg"
mv "$tmp/gg00" "$P/g1/gg00"; mv "$tmp/gg01" "$P/g2/gg01"; rmdir "$tmp"
for w in xgrammar apache_tvm_ffi pydantic-2 pydantic_core annotated_types typing_inspection \
         jsonschema-4 jsonschema_specifications referencing rpds_py; do
  cp "$PEER"/p3/wheels/"$w"*.whl "$P"/w/ 2>/dev/null || echo "missing wheel $w" >&2
done
SITE=$(python3 -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
rm -rf "$P"/w2/gguf "$P"/w2/gguf-*.dist-info
cp -r "$SITE"/gguf "$SITE"/gguf-*.dist-info "$P"/w2/
find "$P"/w2 -name __pycache__ -prune -exec rm -rf {} +
git archive HEAD src scripts tests pyproject.toml > "$P"/snap.tar
if [[ $# -ge 1 ]]; then git archive "$1" src > "$P"/old_src.tar; fi
du -sh "$P"/* | sort -k2
