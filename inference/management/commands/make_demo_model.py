from django.core.management.base import BaseCommand

from ...checkpoint import write_demo_model


class Command(BaseCommand):
    help = ("Write a random-weight RWKV checkpoint with the official key names and shapes "
            "(world vocabulary, 65536 tokens). Its replies are noise: it is for demos, tests and benchmarks.")

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--embd", type=int, default=256, help="embedding size, a multiple of 64")
        parser.add_argument("--rwkv", type=int, choices=[4, 7], default=7, help="RWKV architecture version")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, path, layers, embd, rwkv, seed, **options):
        written = write_demo_model(path, n_layer=layers, n_embd=embd, version=rwkv, seed=seed)
        self.stdout.write(f"wrote RWKV-{rwkv} demo model ({layers} layers, {embd} wide) to {written}")
