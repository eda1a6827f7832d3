"""What every `python -m mintune.<command>` shares: a user's mistake ends in one line on stderr and
exit status 2, not in a traceback.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_command(lambda: do_the_work(args))
"""
from __future__ import annotations

import sys

# A bad file, directory, config value or argument: the message already names it.
USER_ERRORS = (OSError, ValueError)


def run_command(work, also: tuple[type[BaseException], ...] = ()) -> int:
    """Run work(); 0 when it returns, 2 with 'error: <message>' when it raises a user error (or one of `also`)."""
    try:
        work()
    except (*USER_ERRORS, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
