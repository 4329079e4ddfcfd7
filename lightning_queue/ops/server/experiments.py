"""Experiments: status, the live report (from the per-variant aggregates), promote, stop."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from lightning_queue.core.errors import ExperimentError
from lightning_queue.experiments.model import Experiment
from lightning_queue.experiments.report import finite_json, report_from_outcomes, reward_trajectory
from lightning_queue.ops.server.deps import ServicesDep, UserDep, actor

router = APIRouter(tags=["experiments"])


class ExperimentView(BaseModel):
    experiment: Experiment
    report: dict[str, Any] = Field(description="ExperimentReport.to_dict(): variants, comparisons (with the "
                                   "sequential test's state), sample-ratio check, winner.")
    trajectories: dict[str, list[dict[str, Any]]] = Field(
        description="Per variant: the mean reward and its interval after each of up to 60 evenly spaced counts "
        "of rewards, in the order they finished.")


class Promote(BaseModel):
    variant: str | None = Field(None, max_length=128, description="Default: the report's winner.")
    pointer: str = Field("latest", min_length=1, max_length=128)
    expected: str | None = Field(None, max_length=200, description="Move only if the pointer names this id now.")


class Stop(BaseModel):
    reason: str = Field("stopped from the dashboard", min_length=1, max_length=200)


class ConclusionOut(BaseModel):
    experiment: str
    pointer: str | None
    from_id: str | None
    to_id: str | None
    reason: str
    winner: str | None


Alpha = Annotated[float, Query(gt=0, lt=1)]
MinSample = Annotated[int, Query(ge=2, le=10**6)]


@router.get("/experiments", summary="Every experiment, newest first")
def list_experiments(services: ServicesDep, user: UserDep) -> list[Experiment]:
    return services.experiments.all()


@router.get("/experiments/{name}", summary="An experiment and its live report")
def get_experiment(
    services: ServicesDep, user: UserDep, name: str, alpha: Alpha = 0.05, min_sample: MinSample = 30,
) -> ExperimentView:
    exp, outcomes, units = services.experiments.outcomes(name)
    report = report_from_outcomes(exp, outcomes, units, alpha=alpha, min_sample=min_sample)
    return ExperimentView(
        experiment=exp, report=finite_json(report.to_dict()),
        trajectories={n: finite_json(reward_trajectory(o, alpha)) for n, o in outcomes.items()},
    )


@router.post("/experiments/{name}/promote", summary="Move a pointer to a variant and stop the experiment, atomically")
def promote(services: ServicesDep, user: UserDep, name: str, body: Promote) -> ConclusionOut:
    experiments = services.experiments
    variant = body.variant
    if variant is None:  # the winner of the report the page shows, not of a re-read of every rollout
        report = experiments.live_report(name)
        variant = report.winner
        if variant is None:
            raise ExperimentError(
                f"no variant of experiment {name!r} beats the control yet; collect more rollouts, or name the "
                "variant to promote"
            )
    exp = experiments.get(name)
    target = exp.variant(variant).resources_id
    done = experiments.conclude(name, pointer=body.pointer, target=target, winner=variant, expected=body.expected,
                                reason=f"promoted {variant!r} to {body.pointer!r}", by=actor(user),
                                op=f"promote {name}")
    return ConclusionOut(experiment=done.experiment, pointer=done.pointer, from_id=done.from_id, to_id=done.to_id,
                         reason=done.reason, winner=done.winner)


@router.post("/experiments/{name}/stop", summary="Stop routing through a running experiment")
def stop(services: ServicesDep, user: UserDep, name: str, body: Stop) -> Experiment:
    return services.experiments.stop(name, body.reason)
