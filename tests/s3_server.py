"""A local S3 server for the tests (moto's server mode), and buckets on it."""

import subprocess
import sys
import tempfile
from contextlib import contextmanager

from servers import free_port, wait_until_listening

# What a client of the local S3 server authenticates with, as environment.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def running_s3_server():
    """The URL of an S3 server on a free port: moto's server mode (`python -m moto.server`, PyPI's
    `moto[server]`), a separate process that speaks S3's REST API over HTTP; stopped at the end."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
        def output():
            log.seek(0)
            return log.read().decode(errors="replace")

        try:
            wait_until_listening(port, process, output)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait()


def s3_bucket(endpoint, name):
    """A new bucket on the S3 server at `endpoint` (a boto3 Bucket)."""
    import boto3

    resource = boto3.resource("s3", endpoint_url=endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    return resource.create_bucket(Bucket=name)
