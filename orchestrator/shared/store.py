"""The shared job store's layout in Redis: its keys, the Lua scripts that change a job atomically (submit under
the shared bound, start, finish once, cancel while queued), and a job's state and spec as they are stored. A job's
hash counts the runs that completed (`completions`, written or not): more than one would be a job run twice."""

from __future__ import annotations

import pickle
import time

from kiln.errors import KilnError
from orchestrator.jobs import Job, Status

P = "kiln:"
STREAM, GROUP, QUEUED, RUNNING = P + "stream", "workers", P + "queued", P + "running"
RECENT, SEQ = P + "recent", P + "seq"
EVENTS, CONTROL = P + "events", P + "control"
KEEP_S = 3600  # how long a finished job stays readable

SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return -2 end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'state', ARGV[3])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -513)
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
return seq
"""
START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local status = cjson.decode(state)['status']
if status == 'done' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'owner', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""
FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if cjson.decode(ARGV[2])['status'] == 'done' then redis.call('HINCRBY', KEYS[1], 'completions', 1) end
local status = cjson.decode(state)['status']
if status == 'done' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'result', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[4])
return 1
"""
CANCEL_QUEUED = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local s = cjson.decode(state)
if s['status'] ~= 'queued' then return 0 end
s['status'] = 'cancelled'
s['error'] = ARGV[2]
s['error_type'] = 'Cancelled'
s['finished'] = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', cjson.encode(s))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

SCRIPTS = {"submit": SUBMIT, "start": START, "finish": FINISH, "cancel": CANCEL_QUEUED}


def _error_types() -> dict[str, type[KilnError]]:
    found, todo = {}, [KilnError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


def state_of(job: Job) -> dict:
    return {"status": job.status.value, "iteration": job.iteration, "step": job.step, "steps": job.steps,
            "n_iter": job.n_iter, "started": job.started, "finished": job.finished,
            "error": str(job.error) if job.error else None,
            "error_type": type(job.error).__name__ if job.error else None,
            "interrupted": job.interrupted, "skipped": job.skipped}


def apply_state(job: Job, state: dict) -> None:
    job.status = Status(state["status"])
    job.iteration, job.step, job.steps = state["iteration"], state["step"], state["steps"]
    job.started, job.finished = state["started"], state["finished"]
    job.interrupted, job.skipped = state.get("interrupted", False), state.get("skipped", False)
    if state.get("error"):
        job.error = _error_types().get(state.get("error_type") or "", KilnError)(state["error"])


def failed_state(error: str) -> dict:
    """The state of a job that failed before it ran."""
    return {"status": "failed", "iteration": 0, "step": 0, "steps": 0, "n_iter": 1, "started": None,
            "finished": time.time(), "error": error, "error_type": "ServerError"}


def apply_control(job: Job, op: str) -> None:
    """What a client asked of a running job, wherever it asked: cancel, interrupt (AUTOMATIC1111's: stop now, keep
    what is done) or skip (end the current run of n_iter)."""
    if op == "cancel":
        job.cancel()
    elif op == "interrupt":
        job.interrupted = True
    elif op == "skip":
        job.skipped = True


def spec_of(job: Job) -> bytes:
    """What another orchestrator needs to run the job (the prepared request: seeds drawn, checkpoint resolved),
    pickled: Redis is inside the trust boundary, as Triton is."""
    return pickle.dumps({"kind": job.kind, "request": job.request, "n_iter": job.n_iter, "id": job.id,
                         "client_id": job.client_id, "context": job.context, "checkpoint": job.checkpoint,
                         "refiner": job.refiner, "created": job.created})


def job_of(spec: bytes) -> Job:
    """A new Job (queued, nothing done) from its stored spec."""
    fields = pickle.loads(spec)
    return Job(kind=fields["kind"], request=fields["request"], n_iter=fields["n_iter"], id=fields["id"],
               created=fields["created"], client_id=fields["client_id"], context=fields["context"],
               checkpoint=fields["checkpoint"], refiner=fields["refiner"])
