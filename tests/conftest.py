"""What several test files share."""

import pytest


@pytest.fixture
def kill_after(monkeypatch):
    """kill_after(module, name, n): module.name runs n times, then raises KeyboardInterrupt,
    like a run killed at that point (monkeypatch.undo() restores it)."""

    def patch(module, name, n):
        real, calls = getattr(module, name), []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, killed)

    return patch
