#!/usr/bin/env python3
"""scripts/bench-mover.py: a mover Pod in a cluster against the standalone command.

On a local cluster with a real node (kubelet, containerd, the test CSI
driver) and MinIO, a busybox Pod writes a dataset into a claim annotated
for `copy`. The same data is then backed up twice each way, into two fresh
S3 (MinIO) repositories:

  in-cluster   `ferry backup create -n NS` with a mover Pod (the Ferry image)
               that mounts the claim and runs `ferry volume backup` in it;
  standalone   `ferry volume backup DIR` on the host, DIR being the CSI
               driver's directory of the same volume;

first backup and unchanged re-backup, then a full restore each way (the
namespace into a new one, where a mover Pod fills the new claim; and
`ferry volume restore` into an empty directory).

For each step: the wall time of the command and, for backups, the mover's
own time (the volume stats' durationMs, from inside the Pod or the
command). The mover's own time compares the data path (the same code in a
Pod and on the host); the wall time adds what a Pod costs (the Pod, its
Secret, scheduling, the object backup or restore around it).

Results go to --out (default target/bench/mover): results.json (every
measurement, plus `mibPerSec` and `standaloneMibPerSec` of the first
backup by the mover's own time, which `scripts/bench --volumes --in-cluster
FILE` reads) and results.md.

  scripts/bench --mover                          about 667 MiB (2 minutes)
  scripts/bench --mover --small                  a tenth of it
  scripts/bench --mover --env /tmp/tenv/env.json on clusters already up

Without --env it starts its own test environment (one cluster with a node)
in a temporary directory, with the image built from --ferry (default
target/release/ferry, built first), and stops it at the end.
"""

import argparse
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


class Api:
    """The cluster's API server, as its admin, with the standard library."""

    def __init__(self, cluster):
        self.server = cluster["server"]
        self.token = cluster["admin_token"]
        self.ssl = ssl.create_default_context(cafile=cluster["ca_file"])

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, context=self.ssl, timeout=60) as response:
            text = response.read().decode()
            return json.loads(text) if text.startswith("{") else text

    def try_call(self, method, path, body=None):
        try:
            return self.call(method, path, body)
        except Exception:  # noqa: BLE001 - polling: any failure means "not yet"
            return None


def writer_script(scale):
    """A busybox script writing the dataset: random data, text files that
    deduplicate against each other, many small random files."""
    random_mib = max(1, 256 // scale)
    texts = max(1, 32 // scale)
    small = max(10, 3000 // scale)
    return (
        "mkdir -p /data/small; "
        f"head -c {random_mib * MIB} /dev/urandom > /data/random; "
        "i=0; while [ $i -lt 40000 ]; do echo \"line $i of a text file that compresses well, with some words repeated often\"; i=$((i+1)); done > /data/t1; "
        f"j=0; while [ $j -lt {texts} ]; do cat /data/t1 /data/t1 /data/t1 /data/t1 > /data/text$j; j=$((j+1)); done; "
        f"i=0; while [ $i -lt {small} ]; do head -c 8192 /dev/urandom > /data/small/f$i; i=$((i+1)); done; "
        "sync; echo DONE; exec sleep 36000"
    )


def run(cmd, env):
    started = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}{out.stdout}")
    return wall, (json.loads(out.stdout) if out.stdout.strip().startswith("{") else None)


def wait_for(what, check, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    sys.exit(f"timed out waiting for {what}")


def make_bucket(s3, name):
    subprocess.run(
        ["curl", "-sS", "--fail", "--aws-sigv4", f"aws:amz:{s3['region']}:s3",
         "--user", f"{s3['access_key']}:{s3['secret_key']}", "-X", "PUT", f"{s3['endpoint']}/{name}"],
        check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "target/bench/mover"))
    ap.add_argument("--ferry", help="ferry binary (default: target/release/ferry, built first)")
    ap.add_argument("--env", help="env.json of a test environment already up, with a cluster 'node'")
    ap.add_argument("--cluster", default="node", help="the cluster with a node (default node)")
    ap.add_argument("--small", action="store_true", help="a tenth of the data")
    args = ap.parse_args()

    ferry = args.ferry
    if not ferry:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        ferry = str(ROOT / "target/release/ferry")
    own_env = None
    env_file = args.env
    if not env_file:
        own_env = tempfile.mkdtemp(prefix="ferry-mover-bench.")
        subprocess.run([str(ROOT / "scripts/testenv"), "up", "--clusters", f"{args.cluster}=new+node",
                        "--ferry-binary", ferry],
                       env={**os.environ, "FERRY_TESTENV_DIR": own_env}, check=True, stdout=subprocess.DEVNULL)
        env_file = os.path.join(own_env, "env.json")
    try:
        results = bench(json.loads(Path(env_file).read_text()), Path(env_file).parent, args, ferry)
    finally:
        if own_env:
            subprocess.run([str(ROOT / "scripts/testenv"), "down"],
                           env={**os.environ, "FERRY_TESTENV_DIR": own_env}, stdout=subprocess.DEVNULL)
            shutil.rmtree(own_env, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))
    print(f"results in {out}/results.json and results.md")


def bench(env, state, args, ferry):
    cluster = env["clusters"][args.cluster]
    node = cluster["node"]
    api = Api(cluster)
    s3 = env["s3"]
    stamp = str(int(time.time()))
    ns = f"mover-bench-{stamp}"
    api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    api.call("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "annotations": {"backup.ferry.dev/volume-method": "copy"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node["storage_class"],
                 "resources": {"requests": {"storage": "2Gi"}}}})
    api.call("POST", f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "w", "image": node["images"]["busybox"], "imagePullPolicy": "Never",
            "command": ["sh", "-c", writer_script(10 if args.small else 1)],
            "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}})
    wait_for("the writer Pod", lambda: "DONE" in (api.try_call("GET", f"/api/v1/namespaces/{ns}/pods/writer/log") or ""))
    pv = api.call("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/data")["spec"]["volumeName"]
    handle = api.call("GET", f"/api/v1/persistentvolumes/{pv}")["spec"]["csi"]["volumeHandle"]
    found = list((state / "clusters" / args.cluster).glob(f"**/csi-state/volumes/{handle}"))
    if not found:
        sys.exit(f"the CSI driver's directory of volume {handle} is not under {state}")
    data_dir = found[0]
    files = sum(len(f) for _, _, f in os.walk(data_dir))
    data_bytes = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    mib = data_bytes / MIB

    tool_env = {**os.environ, "KUBECONFIG": cluster["kubeconfig"], "FERRY_PASSWORD": "bench-password",
                "AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
                "AWS_REGION": s3["region"], "FERRY_S3_ENDPOINT": s3["endpoint"]}
    repos = {}
    for side in ("pod", "host"):
        bucket = f"mover-bench-{side}-{stamp}"
        make_bucket(s3, bucket)
        repos[side] = f"s3://{bucket}/repo"
        run([ferry, "repo", "init", "--repo", repos[side]], tool_env)
    mover = ["--mover-image", node["images"]["ferry"], "--mover-s3-endpoint", node["s3_endpoint"]]
    subprocess.run(["sync"], check=True)

    steps = []
    host_snapshot = None

    def step(side, name, wall, own_ms=None):
        steps.append({"side": side, "step": name, "wall_s": round(wall, 3),
                      "own_s": None if own_ms is None else round(own_ms / 1000, 3),
                      "mib_per_s_own": None if not own_ms else round(mib / (own_ms / 1000), 1),
                      "mib_per_s_wall": round(mib / wall, 1)})

    for name, backup in (("first backup", "b1"), ("unchanged re-backup", "b2")):
        wall, report = run([ferry, "backup", "create", backup, "-n", ns, "--repo", repos["pod"], *mover, "-o", "json"],
                           tool_env)
        step("in-cluster", name, wall, report["report"]["volumes"][0]["stats"]["durationMs"])
        wall, out = run([ferry, "volume", "backup", str(data_dir), "--repo", repos["host"], "-o", "json"], tool_env)
        step("standalone", name, wall, out["stats"]["durationMs"])
        host_snapshot = host_snapshot if name != "first backup" else out["snapshot"]
        subprocess.run(["sync"], check=True)

    clone = f"{ns}-restored"
    api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": clone}})
    # The claim alone: the writer Pod would write its data again.
    wall, _ = run([ferry, "restore", "b1", "--repo", repos["pod"], "--namespace-mapping", f"{ns}={clone}",
                   "--include-kind", "PersistentVolumeClaim", *mover, "-o", "json"], tool_env)
    step("in-cluster", "full restore", wall)
    target = Path(tempfile.mkdtemp(prefix="ferry-mover-bench-restore."))
    try:
        wall, out = run([ferry, "volume", "restore", host_snapshot, str(target / "data"), "--repo", repos["host"],
                         "-o", "json"], tool_env)
        step("standalone", "full restore", wall, out["stats"]["durationMs"])
    finally:
        shutil.rmtree(target, ignore_errors=True)
    for name in (ns, clone):
        api.try_call("DELETE", f"/api/v1/namespaces/{name}")

    first = {s["side"]: s for s in steps if s["step"] == "first backup"}
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ferry": subprocess.run([ferry, "--version"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
        "dataset": {"files": files, "bytes": data_bytes},
        "steps": steps,
        "mibPerSec": first["in-cluster"]["mib_per_s_own"],
        "standaloneMibPerSec": first["standalone"]["mib_per_s_own"],
        "ownTimeRatio": round(first["standalone"]["own_s"] / first["in-cluster"]["own_s"], 2),
    }


def render(r):
    d = r["dataset"]
    lines = [
        "# In-cluster mover against the standalone command",
        "",
        f"`scripts/bench --mover` on {r['cpus']} cores, {r['generated']}, {r['ferry']}. "
        f"Dataset: {d['files']} files, {d['bytes'] / MIB:.0f} MiB in one claim (method copy), "
        "backed up into fresh MinIO repositories on the same machine.",
        "",
        "Own time is the mover's own measure (the volume stats' durationMs, inside the Pod or the command); "
        "wall time is the whole command's, a Pod's start, Secret and scheduling, and the object backup or restore "
        "around it included. The in-cluster restore is `ferry restore` of the claim into a new namespace "
        "(a mover Pod fills it), whose own time the report does not give.",
        "",
        "| side | step | own s | MiB/s (own) | wall s | MiB/s (wall) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in r["steps"]:
        own = "–" if s["own_s"] is None else f"{s['own_s']:.3f}"
        own_rate = "–" if s["mib_per_s_own"] is None else f"{s['mib_per_s_own']:.1f}"
        lines.append(f"| {s['side']} | {s['step']} | {own} | {own_rate} | {s['wall_s']:.3f} | {s['mib_per_s_wall']:.1f} |")
    lines += ["", f"First backup, own time: the mover Pod runs at {r['ownTimeRatio']:.2f}× the standalone command "
                  f"({r['mibPerSec']} against {r['standaloneMibPerSec']} MiB/s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
