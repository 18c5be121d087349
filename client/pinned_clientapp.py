"""``flwr-clientapp`` with app pinning: an institution runs only the app bundle (FAB) whose hash it pinned.

A SuperNode runs whatever app the SuperLink hands it: for every message, Flower's ``flower-superexec`` starts
``flwr-clientapp`` **by name from PATH** (``flwr/supercore/superexec/executor/subprocess_executor.py``), which pulls
the task and the FAB from the SuperNode, installs the FAB and imports its ClientApp
(``flwr/supernode/runtime/run_clientapp.py``). Flower's own guard (``flower-supernode --trusted-entities``) needs FABs
signed by the Flower platform, which an OSS SuperLink never provides. So ``finlora client`` puts a private 0700
directory first on the SuperNode's PATH holding an executable ``flwr-clientapp`` that runs this file, with the
pinned SHA-256 in ``FINLORA_PINNED_APP_HASH``.

This file is run as a script (never ``-m finlora.client...``) and imports nothing of finlora before the FAB is
checked, so nothing the app loads later (the installed ``finlora`` package, or a FAB's own modules) was imported
ahead of the pin check. It runs Flower's own ``flwr-clientapp``
entry point unchanged, except that it wraps one Flower internal, ``install_from_fab`` as looked up by
``run_clientapp`` (a module global there, called right after ``pull_task_input`` and before anything of the FAB is
written to disk or imported): if the FAB's content hash, or the hash the SuperLink claims for it (which the app
loader uses to find the installed app), is not the pinned one, it raises. ``run_clientapp`` then answers the
message with an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason "app hash <got> is not the pinned
<want>"), which the server records for this node, and the app never runs. Anything unexpected fails closed.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

PIN_ENV = "FINLORA_PINNED_APP_HASH"


class AppNotPinned(RuntimeError):
    """The SuperLink handed this institution an app other than the one it pinned."""


# as the server's error reply names it (this runs as __main__)
AppNotPinned.__module__ = "finlora.client.pinned_clientapp"


def _pinned() -> str:
    """The pinned hash; without a valid one, a marker that no FAB hash equals (every app is refused)."""
    want = os.environ.get(PIN_ENV, "").strip().lower()
    return want if re.fullmatch(r"[0-9a-f]{64}", want) else f"(no valid SHA-256 in {PIN_ENV}: {want[:80]!r})"


def _refuse(got: str, want: str) -> None:
    text = f"app hash {got} is not the pinned {want}"
    print(f"finlora client: REFUSED the app the server sent: {text}; it was not installed or run", file=sys.stderr,
          flush=True)
    raise AppNotPinned(text)


def main() -> None:
    want = _pinned()
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # a script's folder leads sys.path: never let finlora's client/ shadow the app's modules
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime  # Flower 1.42 internals, see the docstring

    original_pull, original_install = runtime.pull_task_input, runtime.install_from_fab
    claimed: list[str] = []

    def pull_task_input(client):  # type: ignore[no-untyped-def]
        message, context, run, fab = original_pull(client)
        claimed.append(str(fab.hash_str).lower())  # the loader finds the installed app by this hash
        return message, context, run, fab

    def install_from_fab(fab_file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not isinstance(fab_file, (bytes, bytearray)):
            raise AppNotPinned(f"unexpected FAB argument of type {type(fab_file).__name__}: refusing to run it")
        got = hashlib.sha256(fab_file).hexdigest()
        if got != want:
            _refuse(got, want)
        if len(claimed) != 1 or claimed[0] != want:
            _refuse(claimed[-1] if claimed else "(none)", want)
        return original_install(fab_file, *args, **kwargs)

    runtime.pull_task_input, runtime.install_from_fab = pull_task_input, install_from_fab
    flwr_clientapp()


if __name__ == "__main__":
    main()
