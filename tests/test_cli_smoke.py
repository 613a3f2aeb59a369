import cli


def test_help_exits_cleanly(capsys):
    assert cli.main([]) == 0
    assert "sdgraph" in capsys.readouterr().out
