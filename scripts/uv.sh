# Sourced by the set-up scripts: puts a pinned uv in .cache/uv and sets $UV.
# uv installs the lock files in requirements/ and checks every file against its hash.
UV_VERSION=0.13.9
UV=.cache/uv/bin/uv
if [ ! -x "$UV" ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  PYTHON="${PYTHON:-python3.11}"
  command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
  rm -rf .cache/uv
  mkdir -p .cache
  "$PYTHON" -m venv .cache/uv
  # The machine's pip configuration (extra local indexes, caps) is not for this: ignore it.
  PIP_CONFIG_FILE=/dev/null .cache/uv/bin/python -m pip install -q --disable-pip-version-check \
    "uv==$UV_VERSION"
fi
export UV_NO_PROGRESS=1
