"""``ordpool bench`` with the peers too: mpire and joblib (loky), when they are installed.

Same options, same methodology, same table as ``ordpool bench`` (see ``ordpool/bench/``), with
mpire's ``WorkerPool.imap`` and joblib's ``Parallel`` over the loky backend
(``return_as="generator"``) in the default engines, each at its best chunk/batch size from the
same sweep as the stdlib pools. ``ordpool bench --engines ordpool,mpire,joblib`` runs them too;
this script only changes the default of ``--engines``. Neither is a dependency of ordpool's
runtime: a missing one is skipped with a message (``pip install 'ordpool[bench]'``).

Usage, from the repository root::

    python bench/peers.py                          # the default comparison + peers
    python bench/peers.py --workload decode --messages 100000 --check
    python bench/peers.py --engines ordpool,mpire  # just these (serial always runs)

joblib's loky backend starts its workers its own way (``--start-method`` does not apply to it)
and has no initializer: with ``--init``, each worker builds its state on its first message.
"""

from __future__ import annotations

import shlex
import sys

from ordpool.bench import build_parser, run_command


def main(argv: list[str] | None = None) -> int:
    """Parse ``ordpool bench``'s options (peers in the default engines), run, print the table."""
    parser = build_parser("bench/peers.py", description=__doc__.split("\n\n")[0].strip("`"))
    parser.set_defaults(engines="ordpool,pool,executor,mpire,joblib")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["bench/peers.py", *argv])
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
