"""What SeaweedFS's CPU pays for the headers our copies carry.

Copies the same N objects (700 bytes, image/png) into a fresh bucket once per variant and
reads the `weed` process's CPU time from /proc around each pass: a plain CopyObject, then
with `MetadataDirective: COPY`, `If-None-Match: *`, `x-amz-copy-source-if-match`, and all
three (what the consumer sends). Each variant runs twice, interleaved, against the noise.
Only the server's CPU is read, so the client's own cost (boto3) does not count.

Usage, with SeaweedFS started by scripts/local-services and nothing else running:
    scripts/local-services up --with-seaweedfs
    python3 scripts/copy_header_cost.py [N]      # default 3000
"""

import concurrent.futures as cf
import os
import sys
import time

import boto3
from botocore.config import Config

STATE = os.environ.get("LOCAL_SERVICES_STATE", "/tmp/avatar-migration-local")
PORT = int(os.environ.get("SEAWEEDFS_PORT", "21680"))


def weed_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    pid = int(open(f"{STATE}/seaweedfs-{PORT}.pid").read().strip())
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{PORT}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(max_pool_connections=64, s3={"addressing_style": "path"}),
    )
    stamp = int(time.time())
    source = f"header-cost-{stamp}"
    s3.create_bucket(Bucket=source)
    keys = [f"image/k{i:06d}.png" for i in range(n)]
    with cf.ThreadPoolExecutor(64) as pool:
        puts = pool.map(
            lambda k: s3.put_object(Bucket=source, Key=k, Body=b"x" * 700, ContentType="image/png"), keys
        )
        etags = {k: r["ETag"] for k, r in zip(keys, puts)}
    variants = {
        "plain": lambda k: {},
        "metadata-copy": lambda k: {"MetadataDirective": "COPY"},
        "if-none-match": lambda k: {"IfNoneMatch": "*"},
        "source-if-match": lambda k: {"CopySourceIfMatch": etags[k]},
        "all three": lambda k: {"MetadataDirective": "COPY", "IfNoneMatch": "*", "CopySourceIfMatch": etags[k]},
    }
    for run, name in enumerate(list(variants) * 2):
        destination = f"header-cost-{stamp}-{run}"
        s3.create_bucket(Bucket=destination)

        def copy(key, name=name, destination=destination):
            s3.copy_object(
                Bucket=destination,
                Key="avatar/" + key.removeprefix("image/"),
                CopySource={"Bucket": source, "Key": key},
                **variants[name](key),
            )

        cpu, started = weed_cpu(pid), time.time()
        with cf.ThreadPoolExecutor(32) as pool:
            list(pool.map(copy, keys))
        cpu, wall = weed_cpu(pid) - cpu, time.time() - started
        print(f"{name:16s} SeaweedFS CPU {cpu / n * 10000:6.2f} s/10k  {n / wall:5.0f} copies/s", flush=True)


if __name__ == "__main__":
    main()
