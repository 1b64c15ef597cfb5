"""
``twistd wsgateway``: command-line options and ``makeService``.

The only module that touches the global reactor. A bad config is reported as
one line (file, section, key, reason) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from twisted_gateway.config import ConfigError, Settings, load_config


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the gateway configured by an INI file (default ./tap.cfg)."
    optParameters = [["config", "c", "tap.cfg", "Path to the config file."]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint (repeatable; replaces [gateway] listen)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        try:
            settings = load_config(self["config"])
            if self["listen"]:
                from twisted_gateway.config import with_listen

                settings = with_listen(settings, self["listen"])
        except ConfigError as e:
            sys.stderr.write(f"wsgateway: {e}\n")
            raise SystemExit(1)
        self["settings"] = settings


def makeService(options: Options):
    from twisted.internet import reactor

    from twisted_gateway.service import GatewayService

    settings: Settings = options["settings"]
    return GatewayService(settings, reactor)
