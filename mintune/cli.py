"""What every `python -m mintune.<command>` shares: a user's mistake ends in one line on stderr and
exit status 2, Ctrl-C in a short line and exit status 130, never in a traceback.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_command(lambda: do_the_work(args))
"""
from __future__ import annotations

import sys
import warnings

# A bad file, directory, config value or argument: the message already names it.
USER_ERRORS = (OSError, ValueError)


class Interrupted(Exception):
    """Ctrl-C, with what the user needs to know next (e.g. the checkpoint to resume from)."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_command(work, also: tuple[type[BaseException], ...] = ()) -> int:
    """Run work(); 0 when it returns, 2 with 'error: <message>' when it raises a user error (or one of
    `also`), 130 with 'interrupted' on Ctrl-C. Warnings print as 'warning: <message>'."""
    warnings.formatwarning = _one_line_warning
    try:
        work()
    except (*USER_ERRORS, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted. {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
