#!/usr/bin/env python
"""Django's command-line utility for rpserver."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rpserver.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # Every configuration error names its variable: the message helps, a traceback would not.
        sys.exit(f"rpserver: configuration error: {exc}")


if __name__ == "__main__":
    main()
