#!/usr/bin/env python3
"""Seed the avatars table and the legacy bucket, the way production looks before the migration.

Usage: sre-challenge-addon1.py N [--modern-share F --production-bucket NAME] [--workers W]

Creates avatars 1..N: a PNG object `image/avatar-<n>.png` in the legacy bucket and a row in
`avatars` whose path is that key. With --modern-share F, a share F of the avatars (spread
evenly) is seeded in the state the live service writes today instead: the object at
`avatar/avatar-<n>.png` in the production bucket and a row pointing at it. That is the
mixed state the migration starts from.

Idempotent: an avatar whose row already exists (legacy or modern path) is left alone, and
uploads overwrite an object with the same bytes. Buckets are created when missing.

Environment (the original add-on's interface):
  DB_CONN_STRING          PostgreSQL connection string (database proddatabase)
  S3_BUCKET_NAME          the legacy bucket
  S3_ENDPOINT_URL         S3 endpoint (empty for AWS)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
  AVATAR_FILE             the PNG uploaded for every avatar (default: avatar.png beside this file)
  S3_PRODUCTION_BUCKET_NAME  default for --production-bucket
"""

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import psycopg
from botocore.config import Config
from botocore.exceptions import ClientError

LEGACY_PREFIX = "image/"
MODERN_PREFIX = "avatar/"
NUMBER = re.compile(r"avatar-(\d+)\.png$")


def fail(message):
    print(f"sre-challenge-addon1: error: {message}", file=sys.stderr)
    sys.exit(2)


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None or value == "":
        fail(f"{name} is not set")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, help="number of avatars (1..N)")
    parser.add_argument("--modern-share", type=float, default=0.0,
                        help="share of avatars seeded already migrated (0..1, default 0)")
    parser.add_argument("--production-bucket",
                        default=os.environ.get("S3_PRODUCTION_BUCKET_NAME"),
                        help="bucket for the modern share (env S3_PRODUCTION_BUCKET_NAME)")
    parser.add_argument("--workers", type=int, default=32,
                        help="concurrent uploads (default 32)")
    args = parser.parse_args()
    if args.count < 0:
        fail("the number of avatars must be >= 0")
    if not 0.0 <= args.modern_share <= 1.0:
        fail("--modern-share must be between 0 and 1")
    if args.modern_share > 0 and not args.production_bucket:
        fail("--modern-share needs --production-bucket (or S3_PRODUCTION_BUCKET_NAME)")
    return args


def is_modern(n, share):
    # Spread the modern share evenly: avatar n is modern when the running total crosses an integer.
    return int(n * share) != int((n - 1) * share)


def ensure_bucket(s3, name):
    try:
        s3.head_bucket(Bucket=name)
    except ClientError:
        s3.create_bucket(Bucket=name)


def main():
    args = parse_args()
    dsn = env("DB_CONN_STRING")
    legacy_bucket = env("S3_BUCKET_NAME")
    endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    avatar_file = os.environ.get("AVATAR_FILE") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "avatar.png")
    try:
        with open(avatar_file, "rb") as f:
            body = f.read()
    except OSError as e:
        fail(f"cannot read AVATAR_FILE {avatar_file}: {e}")

    s3 = boto3.client(
        "s3", endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(max_pool_connections=args.workers, s3={"addressing_style": "path"},
                      retries={"max_attempts": 10, "mode": "adaptive"}))
    started = time.monotonic()
    ensure_bucket(s3, legacy_bucket)
    if args.modern_share > 0:
        ensure_bucket(s3, args.production_bucket)

    try:
        conn = psycopg.connect(dsn, autocommit=False)
    except psycopg.Error as e:
        fail(f"cannot connect to DB_CONN_STRING: {str(e).splitlines()[0]}")
    with conn:
        existing = set()
        with conn.cursor() as cur:
            cur.execute("SELECT path FROM avatars")
            for (path,) in cur:
                m = NUMBER.search(path or "")
                if m:
                    existing.add(int(m.group(1)))

        todo = []  # (bucket, key)
        rows = []
        for n in range(1, args.count + 1):
            modern = is_modern(n, args.modern_share)
            key = f"{MODERN_PREFIX if modern else LEGACY_PREFIX}avatar-{n}.png"
            todo.append((args.production_bucket if modern else legacy_bucket, key))
            if n not in existing:
                rows.append(key)

        def upload(item):
            bucket, key = item
            s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/png")

        # Objects first, rows after: a row never points at an object that does not exist yet.
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for _ in pool.map(upload, todo):
                pass

        with conn.cursor() as cur:
            with cur.copy("COPY avatars (path) FROM STDIN") as copy:
                for key in rows:
                    copy.write_row((key,))
        conn.commit()

    modern = sum(1 for _, key in todo if key.startswith(MODERN_PREFIX))
    print(f"seeded {args.count} avatars ({modern} modern, {args.count - modern} legacy): "
          f"{len(rows)} rows inserted, {len(todo)} objects uploaded "
          f"in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
