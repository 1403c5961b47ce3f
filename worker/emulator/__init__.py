"""A local, strict emulator of Sitecore CDP's order-contact REST API (DESIGN section 1).

Tests, `worker demo` and the benchmark talk to it over real HTTP, so it behaves like the
real service where the worker can tell the difference: creates, listings, reads,
updates (v2 POST, v2.1 PUT and PATCH) and deletes of order contacts under `/v2/` and
`/v2.1/`, HTTP Basic auth on every request, strict validation of the documented body
fields, CDP-shaped error bodies, and no deduplication (a second POST for an order creates
a second contact, exactly like CDP). On top of that it has knobs for the faults the
worker must survive and statistics that let a test prove "exactly one live contact per
order, holding the latest body" and "never more than N requests in any second".

- `config.py`: `EmulatorConfig`, every knob, read afresh on each request (changing an
  attribute, or `PATCH /_emulator/config`, changes behaviour at once);
- `validation.py`: the documented body fields, checked strictly (create, update, PATCH);
- `faults.py`: auth, rate limit, latency, 5xx, timeouts and dropped connections after a
  create, an update or a delete was applied, orders whose writes always fail, orders
  that do not exist yet;
- `app.py`: the routes, the live contacts, the statistics, and `Emulator` (a local server);
- `command.py`: `worker emulator`'s flags and command.

The package imports its parts lazily: `worker check` (every container health probe)
builds the command line, which names the emulator's flags, without loading aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .command import add_cli_arguments, config_from_args, run_from_args

if TYPE_CHECKING:
    from .app import Emulator, build_app
    from .config import EmulatorConfig

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "add_cli_arguments",
    "build_app",
    "config_from_args",
    "run_from_args",
]


def __getattr__(name: str) -> object:
    """`from worker.emulator import Emulator` works, loading the server only then."""
    if name in ("Emulator", "build_app"):
        from . import app

        return getattr(app, name)
    if name == "EmulatorConfig":
        from .config import EmulatorConfig

        return EmulatorConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
