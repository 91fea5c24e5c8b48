#!/usr/bin/env bash
# System packages the tests use: dcm2niix (the reference DICOM converter the real-scanner suite compares
# against), a real Orthanc PACS with DICOMweb, dciodvfy (dicom3tools) to validate
# the derived DICOM we write, dcmtk as an independent DICOM client, and Ghostscript (to prove that no upload
# ever reaches it), HAProxy (the failover benchmark's load balancer) and Chromium + chromedriver (the try-it
# page's browser test, driven by selenium). Needs root (CI runs as root);
# without apt the tests that need these skip and say why.
set -uo pipefail
PKGS="orthanc orthanc-dicomweb dicom3tools ghostscript dcmtk haproxy chromium chromium-driver dcm2niix"
if command -v Orthanc >/dev/null && command -v dciodvfy >/dev/null && command -v gs >/dev/null && [ -x /usr/bin/storescu ] && command -v haproxy >/dev/null && command -v chromedriver >/dev/null && command -v dcm2niix >/dev/null; then exit 0; fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "note: cannot apt-get install $PKGS here (no apt or not root): PACS tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq $PKGS >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq $PKGS >/dev/null; }
# The package's post-install may try to start a system service; the tests start their own instance.
command -v Orthanc >/dev/null && echo "installed: $(Orthanc --version 2>/dev/null | head -1), dciodvfy"
