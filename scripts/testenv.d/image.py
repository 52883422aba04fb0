#!/usr/bin/env python3
"""Builds a one-layer OCI image archive from local files, for the test node.

Images are never pulled on the test node: this writes an OCI image layout
as a tar archive that `ctr images import` loads into containerd.

    image.py NAME OUT.tar --file SRC:DEST[:MODE] ... [--link TARGET:DEST ...]
             [--entrypoint JSON] [--cmd JSON] [--env K=V ...]

SRC is a file on this machine, DEST its absolute path in the image. Every
directory on the way is created. The layer is deterministic (sorted,
timestamps 0, root-owned), so the same inputs give the same image id.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile


def layer(files, links):
    """An uncompressed tar layer of FILES [(src, dest, mode)] and LINKS [(target, dest)]."""
    entries = {}
    for src, dest, mode in files:
        entries[dest] = ("file", src, mode)
    for target, dest in links:
        entries[dest] = ("link", target, 0o777)
    dirs = set()
    for dest in entries:
        parent = os.path.dirname(dest)
        while parent not in ("/", ""):
            dirs.add(parent)
            parent = os.path.dirname(parent)
    dirs.add("/tmp")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def info(name, kind):
            ti = tarfile.TarInfo(name.lstrip("/"))
            ti.type, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = kind, 0, 0, 0, "root", "root"
            return ti
        for d in sorted(dirs):
            ti = info(d, tarfile.DIRTYPE)
            ti.mode = 0o1777 if d == "/tmp" else 0o755
            tar.addfile(ti)
        for dest in sorted(entries):
            kind, value, mode = entries[dest]
            if kind == "link":
                ti = info(dest, tarfile.SYMTYPE)
                ti.linkname, ti.mode = value, 0o777
                tar.addfile(ti)
                continue
            with open(value, "rb") as f:
                data = f.read()
            ti = info(dest, tarfile.REGTYPE)
            ti.size, ti.mode = len(data), mode
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def blob(out, data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ti = tarfile.TarInfo("blobs/sha256/" + digest.split(":")[1])
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    out.addfile(ti, io.BytesIO(data))
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="image reference, e.g. ferry.test/busybox:1.35")
    p.add_argument("out", help="archive to write")
    p.add_argument("--file", action="append", default=[], help="SRC:DEST[:MODE] (octal MODE, default 0755)")
    p.add_argument("--link", action="append", default=[], help="TARGET:DEST symbolic link")
    p.add_argument("--entrypoint", default="null", help="JSON list")
    p.add_argument("--cmd", default="null", help="JSON list")
    p.add_argument("--env", action="append", default=["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"])
    a = p.parse_args()

    files = []
    for spec in a.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1].startswith("/"):
            sys.exit(f"image.py: --file {spec!r}: want SRC:/DEST[:MODE]")
        files.append((parts[0], parts[1], int(parts[2], 8) if len(parts) == 3 else 0o755))
    links = []
    for spec in a.link:
        target, _, dest = spec.partition(":")
        if not dest.startswith("/"):
            sys.exit(f"image.py: --link {spec!r}: want TARGET:/DEST")
        links.append((target, dest))

    layer_tar = layer(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": a.env, "Entrypoint": json.loads(a.entrypoint), "Cmd": json.loads(a.cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/testenv.d/image.py"}],
    }
    with tarfile.open(a.out, "w") as out:
        layer_desc = blob(out, layer_tar, "application/vnd.oci.image.layer.v1.tar")
        config_desc = blob(out, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": [layer_desc]}
        manifest_desc = blob(out, json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
        manifest_desc["annotations"] = {"io.containerd.image.name": a.name, "org.opencontainers.image.ref.name": a.name}
        manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        for name, data in (("oci-layout", {"imageLayoutVersion": "1.0.0"}),
                           ("index.json", {"schemaVersion": 2, "manifests": [manifest_desc]})):
            raw = json.dumps(data).encode()
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(raw), 0, 0o644
            out.addfile(ti, io.BytesIO(raw))


if __name__ == "__main__":
    main()
