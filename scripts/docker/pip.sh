#!/bin/sh
# pip inside an image build. A CA bundle (secret pip_cert) and a package index URL (secret
# pip_index, which may carry credentials) come as BuildKit secrets, mounted for one RUN and never
# written to a layer; wheels the index lacks come from requirements/wheels (bind-mounted at
# /wheels). Proxies: docker's predefined HTTP(S)_PROXY build args, also kept out of the history.
set -eu
if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi
if [ -s /run/secrets/pip_index ]; then PIP_INDEX_URL=$(cat /run/secrets/pip_index); export PIP_INDEX_URL; fi
exec python3 -m pip --disable-pip-version-check --no-cache-dir --no-input "$@" --find-links /wheels
