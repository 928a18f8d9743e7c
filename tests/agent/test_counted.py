"""Messages name a count and a few names, never every name."""

from agent.counted import counted, listed


def test_a_few_names_are_counted_and_all_shown() -> None:
    assert counted(["c", "a", "b"], "service") == "3 services: a, b, c"
    assert counted(["web"], "service") == "1 service: web"
    assert counted([], "service") == "0 services"


def test_many_names_are_counted_with_the_first_few() -> None:
    names = [f"svc{i:05d}" for i in range(50000)]
    text = counted(reversed(names), "service")
    assert text == "50000 services (svc00000, svc00001, svc00002, ...)"
    assert listed(names, "service").startswith("50000 services (svc00000, ")
    assert len(listed(names, "service")) < 200
    assert listed(["b", "a"], "service") == "a, b"
