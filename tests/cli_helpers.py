"""What the CLI tests share: a command line that argparse must reject."""
from __future__ import annotations

import pytest


def usage_error(main, argv: list, capsys) -> str:
    """Runs main(argv), which must stop with argparse's exit status 2 and no traceback; returns stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
