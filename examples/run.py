#!/usr/bin/env python3
"""outrunner's runner script: the ``outrunner`` command, runnable from a checkout.

    python examples/run.py --config farm.yml        # a real farm (needs a token)
    python examples/run.py --check --config farm.yml
    python examples/run.py demo                     # embedded fake GitHub, no token needed

It is the same code as the installed ``outrunner`` command (:func:`outrunner.cli.main`), whose
service path is the whole composition a library user needs::

    config = load_config(path)                      # strict: errors name file, key and value
    service = Service(config, token=token, max_runners=2, drain_timeout=900)
    asyncio.run(serve(service))                     # SIGTERM drains, a second signal forces

``outrunner --help`` lists the flags, the token's precedence and the exit statuses (0 clean
shutdown, 1 runtime error, 2 usage error, 78 config error, 130 interrupted).
"""

from __future__ import annotations

import sys

from outrunner.cli import main

if __name__ == "__main__":
    sys.exit(main())
