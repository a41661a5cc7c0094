def test_smoke_tmp() -> None:
    assert sum(range(5)) == 10
