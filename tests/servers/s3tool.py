#!/usr/bin/env python3
"""The S3 tests' oracle: boto3 (not diskconv's client) looks at what the server holds.

s3tool.py CMD BUCKET [KEY] [FILE], with DISKCONV_TEST_S3_ENDPOINT / _ACCESS_KEY / _SECRET_KEY:
  mkbucket B        create bucket B (fine if it exists)
  sha256 B K        stream object K and print "<sha256> <length>"
  range B K OFF LEN print the sha256 of LEN bytes of object K from OFF (a ranged GET)
  get B K FILE      download object K to FILE
  put B K FILE      upload FILE as object K
  head B K          print {"exists", "etag", "length", "metadata"} as JSON
  uploads B         print the open multipart uploads as a JSON list of {"key", "id"}
  abort B           abort every open multipart upload in B (cleanup after SIGKILL)
"""
import hashlib
import json
import os
import sys

import boto3
import botocore.config
import botocore.exceptions


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["DISKCONV_TEST_S3_ENDPOINT"],
        aws_access_key_id=os.environ["DISKCONV_TEST_S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["DISKCONV_TEST_S3_SECRET_KEY"],
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def main():
    cmd, bucket, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    s3 = client()
    if cmd == "mkbucket":
        try:
            s3.create_bucket(Bucket=bucket)
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            pass
    elif cmd == "sha256":
        body = s3.get_object(Bucket=bucket, Key=rest[0])["Body"]
        h, n = hashlib.sha256(), 0
        for chunk in iter(lambda: body.read(8 << 20), b""):
            h.update(chunk)
            n += len(chunk)
        print(h.hexdigest(), n)
    elif cmd == "range":
        off, n = int(rest[1]), int(rest[2])
        body = s3.get_object(Bucket=bucket, Key=rest[0], Range=f"bytes={off}-{off + n - 1}")["Body"]
        print(hashlib.sha256(body.read()).hexdigest())
    elif cmd == "get":
        s3.download_file(bucket, rest[0], rest[1])
    elif cmd == "put":
        s3.upload_file(rest[1], bucket, rest[0])
    elif cmd == "head":
        try:
            h = s3.head_object(Bucket=bucket, Key=rest[0])
            print(json.dumps({"exists": True, "etag": h["ETag"].strip('"'),
                              "length": h["ContentLength"], "metadata": h.get("Metadata", {})}))
        except botocore.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise
            print(json.dumps({"exists": False}))
    elif cmd in ("uploads", "abort"):
        ups = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if cmd == "abort":
            for u in ups:
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        print(json.dumps([{"key": u["Key"], "id": u["UploadId"]} for u in ups]))
    else:
        sys.exit(f"unknown command {cmd}")


main()
