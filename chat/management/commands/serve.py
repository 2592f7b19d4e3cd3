import logging

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

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
        from daphne.server import Server

        from inference.checkpoint import CheckpointError
        from inference.runtime import load_engine

        call_command("migrate", interactive=False, verbosity=0)
        try:
            load_engine(model=model, strategy=strategy, jit_on=bool(jit_on), cuda_on=bool(cuda_on))
        except (CheckpointError, ValueError) as exc:
            raise CommandError(str(exc))
        from rpserver.asgi import application

        logger.info("rpserver listening on http://%s:%s/ (admin at /admin/)", host, port)
        Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            http_timeout=None,
            websocket_timeout=None,
            application_close_timeout=10,
            verbosity=0,
            server_name="rpserver",
        ).run()
