#!/usr/bin/env python3
"""Create (idempotently) the buckets and the queue with its dead-letter queue on the local S3/SQS
server, and print the queue URL.

Usage: local-resources.py SOURCE_BUCKET DESTINATION_BUCKET QUEUE_NAME [--max-receive-count N]
       [--visibility-timeout S] [--reset]

With --reset, a start over: both buckets are emptied and both queues purged first (for a local
stack that runs again on servers that kept the last run's state).
Environment: AWS_ENDPOINT_URL (the local server), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION.
"""
import argparse
import json
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source_bucket")
    p.add_argument("destination_bucket")
    p.add_argument("queue_name")
    p.add_argument("--max-receive-count", type=int, default=5)
    p.add_argument("--visibility-timeout", type=int, default=60)
    p.add_argument("--reset", action="store_true",
                   help="empty both buckets and purge both queues first")
    args = p.parse_args()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                      config=Config(s3={"addressing_style": "path"}))
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)
    if args.reset:
        reset(s3, sqs, (args.source_bucket, args.destination_bucket),
              (args.queue_name, f"{args.queue_name}-dlq"))
    for bucket in (args.source_bucket, args.destination_bucket):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            s3.create_bucket(Bucket=bucket)
    dlq_url = sqs.create_queue(QueueName=f"{args.queue_name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    attributes = {
        "VisibilityTimeout": str(args.visibility_timeout),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn,
                                     "maxReceiveCount": str(args.max_receive_count)}),
    }
    try:
        url = sqs.create_queue(QueueName=args.queue_name, Attributes=attributes)["QueueUrl"]
    except ClientError:  # exists with other attributes: bring them in line
        url = sqs.get_queue_url(QueueName=args.queue_name)["QueueUrl"]
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    print(url)


def reset(s3, sqs, buckets, queues):
    """Empties the buckets (every version) and purges the queues that exist."""
    for bucket in buckets:
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            continue
        deleted = 0
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                      for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if doomed:
                answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
                if answer.get("Errors"):
                    raise SystemExit(f"cannot empty s3://{bucket}: {answer['Errors'][0]}")
                deleted += len(doomed)
        print(f"reset: s3://{bucket} emptied ({deleted} objects)", file=sys.stderr)
    for name in queues:
        try:
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError:
            continue
        sqs.purge_queue(QueueUrl=url)
        print(f"reset: queue {name} purged", file=sys.stderr)


if __name__ == "__main__":
    main()
