"""`environment_factory`: one environment per episode, reset with its dataset row, its public methods the tools.

TRL's contract. `environment_factory` is a class or callable that makes an environment, or a dict of them, each
row choosing one by its `environment` column. An environment defines `reset(**row)`, called with the episode's
dataset row before generation; a string it returns is appended to the prompt's last message. Its public methods
(not `reset`, not `get_reward`, no leading underscore) are the episode's tools, bound to that instance. An
optional `get_reward()` (sync or async) scores the finished episode: it becomes one more reward function, weight
1, named after the class, which scores only episodes of that exact class (None for the others). Instances are
pooled: made once, reset for every episode, more made only when a round needs more at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from grpo.rollout.toolbox import check_tools

CONTROL_METHODS = ("reset", "get_reward")


def public_methods(environment: Any) -> list[str]:
    """The methods that are tools, looked up on the class (so properties are not evaluated)."""
    return [name for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in CONTROL_METHODS]


class Environments:
    """The factories, their pools of instances and what each environment adds: tools and a reward."""

    def __init__(self, environment_factory: Callable[[], Any] | dict[str, Callable[[], Any]]):
        self.by_name = isinstance(environment_factory, dict)  # rows choose by their `environment` column
        self.factories = dict(environment_factory) if self.by_name else {None: environment_factory}
        if not self.factories:
            raise ValueError("environment_factory is an empty dict; give at least one environment factory.")
        self.pools: dict[Any, list[Any]] = {}
        self.reward_classes: list[type] = []
        for name, factory in self.factories.items():
            where = "environment_factory" if name is None else f"environment_factory[{name!r}]"
            if not callable(factory):
                raise TypeError(f"{where} is a {type(factory).__name__}; it must be a class or a callable that "
                                "returns an environment.")
            instance = factory()  # a probe, kept as the pool's first instance
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(f"{where} makes a {type(instance).__name__}, which has no reset(**row) method; "
                                 "every environment needs one, called with the dataset row before each episode.")
            check_tools([getattr(instance, method) for method in public_methods(instance)],
                        where=f"{type(instance).__name__}'s methods")
            self.pools[name] = [instance]
            if callable(getattr(instance, "get_reward", None)) and type(instance) not in self.reward_classes:
                self.reward_classes.append(type(instance))

    @property
    def tools(self) -> list[Callable[..., Any]]:
        """Every environment's tools (of one instance each), for what depends on all of them (prompt lengths)."""
        tools: list[Callable[..., Any]] = []
        for pool in self.pools.values():
            tools += [t for t in environment_tools(pool[0]) if t.__name__ not in {u.__name__ for u in tools}]
        return tools

    def reward_functions(self) -> list[Callable[..., Any]]:
        """One reward function per environment class with a `get_reward`."""
        return [environment_reward(cls) for cls in self.reward_classes]

    def check_rows(self, columns: list[str], values: list[Any] | None = None) -> None:
        """With a dict of factories, rows need an `environment` column naming one of them (`values`: the whole
        column where it can be read cheaply, so a wrong name fails before training rather than rounds into it)."""
        if not self.by_name:
            return
        if "environment" not in columns:
            raise ValueError(f"environment_factory is a dict of environments ({', '.join(map(str, self.factories))}),"
                             f" so each row picks one in an 'environment' column; the dataset's columns are "
                             f"{columns}.")
        for value in set(values or []):
            self._check_name(value)

    def _check_name(self, name: Any) -> None:
        if name not in self.factories:
            raise ValueError(f"a row has environment={name!r}, which is not among the environments of "
                             f"environment_factory: {list(self.factories)}.")

    def start_episodes(self, rows: list[dict[str, Any]], g: int) -> list[tuple[Any, Any]]:
        """(environment, prompt) for each of the G episodes of every row: an instance from the pool, reset with the
        row, and the row's prompt with what `reset` returned appended to its last message."""
        handed_out: dict[Any, int] = {}
        episodes = []
        for row in rows:
            name = row.get("environment") if self.by_name else None
            self._check_name(name)
            reset_arguments = {k: v for k, v in row.items() if k != "environment"} if self.by_name else row
            for _ in range(g):
                pool, index = self.pools[name], handed_out.get(name, 0)
                if index == len(pool):
                    pool.append(self.factories[name]())
                handed_out[name] = index + 1
                environment = pool[index]
                observation = environment.reset(**reset_arguments)
                episodes.append((environment, with_observation(row["prompt"], observation)))
        return episodes


def environment_tools(environment: Any) -> list[Callable[..., Any]]:
    return [getattr(environment, name) for name in public_methods(environment)]


def with_observation(prompt: list[dict[str, Any]], observation: Any) -> list[dict[str, Any]]:
    """The prompt with `reset`'s return value appended to its last message's content, as TRL does (no separator);
    a new list, so the dataset row is left as it was."""
    if observation is None:
        return prompt
    if not isinstance(observation, str):
        raise TypeError(f"reset() returned a {type(observation).__name__}; it must return None or a string to "
                        "append to the prompt.")
    return [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + observation}]


def environment_reward(cls: type) -> Callable[..., Any]:
    """`get_reward` of the episodes whose environment is exactly `cls` (None for the others), as a reward function
    named after the class. It reads the live instances, so it runs in the trainer's process (`runs_in_process`)."""
    if inspect.iscoroutinefunction(cls.get_reward):
        async def reward(environments: list[Any], **kwargs: Any) -> list[float | None]:
            return [await e.get_reward() if type(e) is cls else None for e in environments]
    else:
        def reward(environments: list[Any], **kwargs: Any) -> list[float | None]:
            return [e.get_reward() if type(e) is cls else None for e in environments]
    reward.__name__ = reward.__qualname__ = cls.__name__
    reward.runs_in_process = True  # type: ignore[attr-defined]
    return reward
