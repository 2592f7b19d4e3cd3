import logging
import os
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db.utils import OperationalError

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = ("Apply pending migrations, load the model once and serve the whole app "
            "(API, streams, admin) with daphne.")

    def add_arguments(self, parser):
        parser.add_argument("--model", help="RWKV checkpoint path, with or without .pth (default: the demo model)")
        parser.add_argument("--port", type=int, default=8888)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--strategy", default=None, help='e.g. "cpu fp32", "cpu bf16", "cuda fp16"')
        parser.add_argument("--cuda_on", type=int, choices=[0, 1], default=0,
                            help="compile the rwkv package's CUDA kernel (RWKV_CUDA_ON)")
        parser.add_argument("--jit_on", type=int, choices=[0, 1], default=1,
                            help="TorchScript: our RWKV-7 forward, and the rwkv package (RWKV_JIT_ON)")

    def handle(self, model, port, host, strategy, cuda_on, jit_on, **options):
        from daphne.endpoints import build_endpoint_description_strings

        from inference.checkpoint import CheckpointError
        from inference.runtime import load_engine
        from locks import services as locks
        from rpserver.orphans import start_sweeping
        from rpserver.server import Server

        try:
            call_command("migrate", interactive=False, verbosity=0)
        except OperationalError as exc:
            raise CommandError(f"the database cannot be reached (RPSERVER_DATABASE_URL): {exc}".strip())
        locks.instance()  # registers this process, freeing the locks of a dead predecessor at once
        start_sweeping()  # files a crash left unreferenced: 5 minutes after start, then hourly
        try:
            engine = load_engine(model=model, strategy=strategy, jit_on=bool(jit_on), cuda_on=bool(cuda_on))
        except (CheckpointError, ValueError) as exc:
            locks.stop_instance()
            raise CommandError(str(exc))
        from rpserver.asgi import application

        forwarded = settings.RPSERVER["TRUST_X_FORWARDED_FOR"]
        logger.info("rpserver listening on http://%s:%s/ (admin at /admin/)", host, port)
        try:
            Server(
                application=application,
                endpoints=build_endpoint_description_strings(host=host, port=port),
                http_timeout=None,
                websocket_timeout=None,
                application_close_timeout=10,
                verbosity=0,
                server_name="rpserver",
                proxy_forwarded_address_header="X-Forwarded-For" if forwarded else None,
                proxy_forwarded_port_header="X-Forwarded-Port" if forwarded else None,
                proxy_forwarded_proto_header="X-Forwarded-Proto" if forwarded else None,
            ).run()
        finally:
            # The engine's thread must be out of the model before the interpreter
            # exits (a thread killed inside a PyTorch call aborts the process).
            engine.stop()
            locks.stop_instance()
            logger.info("rpserver stopped")
            # Everything is stopped and stored: leave without the interpreter's
            # teardown, where PyTorch's own threads can crash the process (SIGSEGV
            # or "terminate called without an active exception").
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
