"""Run `python -m mintune.<module> ARGS` inside the test process, as `python -m` runs it.

runpy executes the module as __main__ without importing it under its own name: importing
mintune.generate (the command line) would replace the function mintune.generate on the package.
"""
import runpy
import sys
import warnings


def python_m(module: str, argv: list, capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m mintune.<module> ARGV`."""
    monkeypatch.setattr(sys, "argv", [f"mintune.{module}", *map(str, argv)])
    capsys.readouterr()  # what was printed before is not part of this command's output
    try:
        with warnings.catch_warnings():
            # runpy warns when the module was imported already (by another mintune module): running a fresh
            # copy of it as __main__ is what is wanted here, and these modules keep no state
            warnings.filterwarnings("ignore", r"'mintune\.\w+' found in sys\.modules", RuntimeWarning)
            runpy.run_module(f"mintune.{module}", run_name="__main__")
        status = 0
    except SystemExit as e:  # the modules end with sys.exit(main()); argparse exits on -h or a bad argument
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err
