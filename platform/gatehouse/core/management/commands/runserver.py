"""`runserver` as Django ships it (static files included), with TCP_NODELAY on its connections.

The stdlib handler writes a response's headers and body in separate sends; with Nagle's algorithm on, the
second waits for the client's delayed ACK, so every keep-alive request took ~40 ms on loopback. `make run`
serves with this server, so it matters for the demo and for the gate latency measured against it.
"""
from django.contrib.staticfiles.management.commands.runserver import Command as StaticfilesRunserver
from django.core.servers.basehttp import WSGIRequestHandler


class Command(StaticfilesRunserver):
    def inner_run(self, *args, **options):
        WSGIRequestHandler.disable_nagle_algorithm = True
        return super().inner_run(*args, **options)
