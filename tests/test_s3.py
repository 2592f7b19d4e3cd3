"""The state store in an S3-compatible bucket (django-storages), against a local S3 server.

The S3 server is moto's server mode (the s3_endpoint fixture): a separate
process that speaks S3's REST API over HTTP. django-storages talks to it through boto3 exactly as it would to AWS or
MinIO (PUT, GET, HEAD, DELETE, ListObjectsV2 on real URLs), so the upload,
download, naming and deletion paths are the ones production runs. What it
does not reproduce: AWS's permissions and network latency.
"""

import base64
import io
import os
import tempfile

import pytest
from PIL import Image

from conftest import CHARACTER, S3_CREDENTIALS, Api, Server, s3_bucket, wait_for

BUCKET = "rpserver-states"


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """(endpoint URL, the bucket as a boto3 Bucket)."""
    return s3_endpoint, s3_bucket(s3_endpoint, BUCKET)


@pytest.fixture(scope="module")
def local_media():
    return tempfile.mkdtemp(prefix="rpserver-s3-media-")


@pytest.fixture(scope="module")
def s3_server(s3, local_media):
    endpoint, _ = s3
    running = Server(env={**S3_CREDENTIALS, "RPSERVER_S3_BUCKET": BUCKET, "RPSERVER_S3_ENDPOINT_URL": endpoint,
                          "RPSERVER_MEDIA_ROOT": local_media}, name="s3-server").start()
    yield running
    running.stop()


def keys(bucket):
    return {item.key for item in bucket.objects.all()}


def png_data_url():
    output = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(output, "PNG")
    return "data:image/png;base64," + base64.b64encode(output.getvalue()).decode()


def test_states_and_avatars_live_in_the_bucket(s3, s3_server, local_media):
    _, bucket = s3
    before = keys(bucket)
    api = Api(s3_server.url)
    data = api.ok("/login/tmp")
    guest = Api(s3_server.url, data["user_name"], data["token"])
    guest.ok("/characters/save", **CHARACTER, avatar=png_data_url())
    for i in range(4):
        guest.reply("Mira", f"message {i}")
    # The character's own objects: its avatar and its conversation's states.
    # (The shared state cache may spill states too, under states/cache/: they
    # belong to no character and go by the cache's own budget.)
    added = {key for key in keys(bucket) - before if not key.startswith("states/cache/")}
    assert any(key.startswith("avatars/") and key.endswith(".png") for key in added)
    assert len([key for key in added if key.startswith("states/")]) >= 3
    assert not any(files for _, _, files in os.walk(local_media))  # nothing on the local disk
    served = guest.ok("/characters/get", character_name="Mira")["avatar"]
    assert served.startswith("data:image/png;base64,") and len(served) > 40

    # Rolling back and regenerating read their states back from the bucket.
    chat = guest.chat("Mira")
    guest.ok("/chat/back", character_name="Mira", log_index=2)
    assert guest.chat("Mira") == chat[:3]
    frames, _ = guest.stream("/chat/resay", character_name="Mira")
    assert guest.chat("Mira") == chat[:2] + [[chat[2][0], frames[-1]]]
    context = guest.context("Mira")

    # A restarted process (or another one) continues from the bucket alone.
    s3_server.restart()
    again = Api(s3_server.url, guest.user_name, guest.token)
    assert again.context("Mira") == context
    again.reply("Mira", "after the restart")
    assert len(again.chat("Mira")) == 4

    # Deleting the character removes its objects (not the shared state cache's:
    # a state keyed by its exact tokens stays for whoever starts with them).
    again.ok("/characters/del", character_name="Mira")
    own = {key for key in added if not key.startswith("states/cache/")}
    wait_for(lambda: not keys(bucket) & own, "the character's objects to leave the bucket")  # (deleted after the answer)
    assert "Traceback" not in s3_server.log()
