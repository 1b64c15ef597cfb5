"""
``python -m twisted_gateway.token``: mint a token the gateway accepts, for demos.

It signs with the HMAC secret of the config's ``[auth]`` section and prints the
token alone on stdout. A public-key config cannot be served: the gateway holds
only the public half, so there is nothing here to sign with.
"""

from __future__ import annotations

import sys
import time

import jwt
from twisted.python import usage

from twisted_gateway._bases import Options as _Options
from twisted_gateway.config import load_config
from twisted_gateway.schema import AuthSettings, ConfigError, parse_positive_int


class Options(_Options):
    synopsis = "python -m twisted_gateway.token --config tap.cfg --sub alice [--ttl 3600]"
    longdesc = "Print a token signed with the HMAC secret of the config's [auth] section."
    optParameters = [
        ["config", "c", "tap.cfg", "The gateway config whose [auth] section signs the token."],
        ["sub", "s", None, "The subject (sub claim) the token names."],
        ["ttl", "t", 3600, "Seconds until the token expires.", parse_positive_int],
    ]

    def postOptions(self) -> None:
        if not self["sub"]:
            raise usage.UsageError("--sub is required")


def read_auth_settings(path: str) -> AuthSettings:
    """The ``[auth]`` section of a config file, validated as the gateway does."""
    settings = load_config(path)
    if settings.auth is None:
        raise ConfigError(path, "auth", None, "missing section: nothing to sign with")
    return settings.auth


def mint(settings: AuthSettings, subject: str, ttl: int, now: float, source: str) -> str:
    """A token for ``subject`` valid from ``now`` for ``ttl`` seconds, as the settings check it."""
    if settings.secret is None:
        reason = f"{settings.algorithms[0]} needs a private key, which the gateway does not hold"
        raise ConfigError(source, "auth", None, f"cannot mint tokens: {reason}")
    claims: dict[str, object] = {"sub": subject, "iat": int(now), "exp": int(now) + ttl}
    if settings.audience:
        claims["aud"] = settings.audience[0]
    if settings.issuer:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithms[0])


def main(argv: list[str] | None = None) -> int:
    options = Options()
    try:
        options.parseOptions(argv)
        settings = read_auth_settings(options["config"])
        token = mint(settings, options["sub"], options["ttl"], time.time(), options["config"])
    except usage.UsageError as e:  # a ConfigError is one too
        print(f"twisted_gateway.token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
