"""The suite's fixtures, and the names its files import from here.

What sets the run up lives in small modules beside this one (tests/ is on sys.path):
- environment.py: the data directory, the settings shared with every server, the database
  (SQLite, or PostgreSQL for `make test-postgres`), Django set up and migrated; imported first;
- tiny_models.py: the tiny real model and its endless variant, written into the data directory;
- servers.py: `manage.py serve` in a subprocess (Server), the one loop that waits for a server to
  listen, and the setting for replies that run until their reader leaves;
- clients.py: the legacy API's client (Api), users, the Mira character, replies held running;
- waiting.py: waiting for events rather than time (wait_for), threads started together (at_once);
- state_checks.py: how close a state read again must be to the first;
- s3_server.py: a local S3 server (moto) and buckets on it.
How tests synchronise, what they may and may not assume: docs/testing.md.
"""

import pytest

import environment  # noqa: I001 - first: the settings and Django, before anything imports them
from environment import (DATA_DIR, DATABASE_INDEPENDENT, ENDLESS_MODEL, ONE_CORE, ROOT, TEST_DATABASE,  # noqa: F401
                         TEST_ENV, TINY_MODEL)
from tiny_models import write_endless_model  # noqa: F401 - writes the models
from clients import CHARACTER, Api, answer_held, first_frame, make_user, running_reply, until_not_busy  # noqa: F401
from s3_server import S3_CREDENTIALS, running_s3_server, s3_bucket  # noqa: F401
from servers import UNTIL_THE_READER_LEAVES, Server, free_port, wait_until_listening  # noqa: F401
from state_checks import assert_same_state, server_precision, state_errors  # noqa: F401
from waiting import at_once, wait_for  # noqa: F401


def pytest_collection_modifyitems(config, items):
    """The PostgreSQL run leaves out the files whose outcome does not depend on the database."""
    if environment.TEST_DATABASE != "postgres":
        return
    left_out = [item for item in items if item.path.name in DATABASE_INDEPENDENT]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.path.name not in DATABASE_INDEPENDENT]


@pytest.fixture(scope="session")
def server():
    """The suite's server: the tiny model, replies of at most 12 tokens."""
    running = Server().start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def endless_server():
    """A server whose replies run until their reader leaves (the endless model, UNTIL_THE_READER_LEAVES):
    for every test that needs a reply still running while it does something else."""
    running = Server(model=ENDLESS_MODEL, env=UNTIL_THE_READER_LEAVES, name="endless").start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of a local S3 server (s3_server.running_s3_server)."""
    with running_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def api(server):
    return Api(server.url)


@pytest.fixture
def guest(api):
    data = api.ok("/login/tmp")
    return Api(api.url, data["user_name"], data["token"])


@pytest.fixture
def alice(api):
    return make_user(api, "alice")


@pytest.fixture
def bob(api):
    return make_user(api, "bob")


@pytest.fixture
def mira(guest):
    """A guest with a character called Mira and an open conversation."""
    guest.ok("/characters/save", **CHARACTER)
    guest.chat("Mira")
    return guest


def path_rounds(user_name):
    """The rounds on the current paths of a user's main chats (the legacy API's rounds), by index,
    as a queryset; the other branches of the trees are left out."""
    from chat.models import Conversation, Round
    from chat.tree import path_of

    pks = [round_.pk for conversation in Conversation.objects.filter(owner__username=user_name, is_fork=False)
           for round_ in path_of(conversation)]
    return Round.objects.filter(pk__in=pks).order_by("index")
