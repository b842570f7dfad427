#!/usr/bin/env bash
# Let Twisted find the drop-ins of twisted/plugins/ (xenpool_plugins.py: the twistd commands;
# xenpool_sctp.py: the sctp: endpoint strings) in an editable install of this checkout.
#
# An editable install maps xenpool and xenpool_plugins to the checkout through an import hook,
# but twistd looks for drop-ins only in twisted/plugins/ directories of sys.path entries. Putting
# the checkout itself on sys.path would also make its plugins/ and tests/ importable as top-level
# packages, so the venv gets a directory of its own on sys.path that holds nothing but a link to
# the drop-ins.   usage: scripts/link-twisted-dropin.sh [VENV]   (default: the checkout's .venv)
set -euo pipefail
checkout=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "${1:-$checkout/.venv}" && pwd)
dropins="$venv/xenpool-dropins"
mkdir -p "$dropins/twisted/plugins"
for dropin in "$checkout"/twisted/plugins/*.py; do
    ln -sfn "$dropin" "$dropins/twisted/plugins/$(basename "$dropin")"
done
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$dropins" > "$site/xenpool-twisted-dropins.pth"
