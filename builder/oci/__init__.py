"""The OCI and registry layer: the wire format (`manifest`: media types, descriptors, index → platform),
docker's credentials (`auth`), the one HTTP client of the distribution API (`client`: transport, auth
challenges, retries, caps, deadlines) and one repository's operations (`repository`: the one manifest
fetch-and-verify, blobs into the verified cache, uploads and mounts). The registry source
(`source/registry.py`) and publishing (`publish.py`) are both built on it."""
