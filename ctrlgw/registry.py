"""
The local registry: controller id to its one live connection in this process.

The registry only remembers; L{ctrlgw.interfaces.IOwnership} decides.  Every operation
compares session epochs, so the order in which claims complete or connections report their
loss cannot leave an older connection registered over a newer one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from ctrlgw.interfaces import IControllerConnection


class ConnectionRegistry:
    def __init__(self, rememberSuperseded: int = 100_000) -> None:
        self._byController: dict[str, IControllerConnection] = {}
        # The newest epoch announced by other instances per controller (bounded, oldest
        # forgotten first): a claim that completes here after a newer one was announced
        # elsewhere must lose at once, even though nothing was bound to kill yet.
        self._announced: OrderedDict[str, int] = OrderedDict()
        self._rememberSuperseded = rememberSuperseded

    def __len__(self) -> int:
        return len(self._byController)

    def bind(self, connection: IControllerConnection) -> IControllerConnection | None:
        """
        Register C{connection} for its session's controller.

        @return: the connection that lost and must be closed as taken over: the one
            previously registered, or C{connection} itself when the registered one has a
            higher epoch (its claim completed later but began earlier); C{None} when
            nothing was registered.
        """
        session = connection.session
        assert session is not None
        if self._announced.get(session.controller, 0) > session.epoch:
            return connection
        current = self._byController.get(session.controller)
        if current is connection:
            return None
        if current is not None:
            assert current.session is not None
            if current.session.epoch > session.epoch:
                return connection
        self._byController[session.controller] = connection
        return current

    def unbind(self, connection: IControllerConnection) -> bool:
        """
        Forget C{connection} if, and only if, it is the registered one: a late loss of a
        superseded connection leaves its successor in place.
        """
        session = connection.session
        if session is None or self._byController.get(session.controller) is not connection:
            return False
        del self._byController[session.controller]
        return True

    def lookup(self, controller: str) -> IControllerConnection | None:
        return self._byController.get(controller)

    def supersededBy(self, controller: str, epoch: int) -> IControllerConnection | None:
        """
        Note that C{controller} has a session of C{epoch} elsewhere, and return the
        registered connection of C{controller} if its epoch is lower: the one to drop.
        """
        if epoch > self._announced.get(controller, 0):
            self._announced[controller] = epoch
            self._announced.move_to_end(controller)
            while len(self._announced) > self._rememberSuperseded:
                self._announced.popitem(last=False)
        current = self._byController.get(controller)
        if current is not None and current.session is not None and current.session.epoch < epoch:
            return current
        return None

    def __iter__(self) -> Iterator[IControllerConnection]:
        return iter(list(self._byController.values()))
