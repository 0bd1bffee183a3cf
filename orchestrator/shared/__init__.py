"""A job store and queue in Redis shared by several orchestrators (`kiln serve --redis URL`): SharedQueue
(orchestrator.shared.queue) has JobQueue's interface, its Runner (orchestrator.shared.runner) runs the store's jobs
here; orchestrator.shared.store holds the keys, scripts and stored forms. Every orchestrator accepts jobs into one
queue and runs them on its own workers; any of them answers for any job.

- A job's spec (the prepared request, pickled: Redis is trusted as Triton is), state (JSON) and, once finished, its
  images live in the hash `kiln:job:{id}`. Submitting checks the shared bound and the id in one Lua script, then
  adds the id to the waiting set `kiln:queued` (the bound, and queue positions) and to the stream `kiln:stream`.
- Each orchestrator reads the stream in the consumer group `workers` while it has a free worker, marks the job
  running (a script: a job cancelled meanwhile is only acknowledged) and runs it on a local JobQueue. Its state,
  progress events (pub/sub `kiln:events`) and latest latents (previews) go to Redis as it runs; it finishes the
  job once (a script: a job already finished is not written again), then acknowledges the stream entry.
- While a job runs its entry's idle time is reset every lease / 3; an orchestrator that dies stops doing so, and
  after the lease another one claims the entry (XAUTOCLAIM) and runs the job again, with the same seeds. A job whose
  finished state was written before its orchestrator died is only acknowledged. An orchestrator that finds a job it
  runs claimed by another (Redis away longer than the lease, or a stalled process) stops it and leaves its end to
  the other one; should that one stop in turn, the job can come back and run here again.
- Cancel, interrupt and skip go to the running orchestrator over pub/sub `kiln:control` (and are kept in the hash
  for an orchestrator that picks the job up later). A queued job is cancelled at once, by a script.
- The accepting orchestrator (and any that is asked) keeps a mirror Job, updated from the events and read again
  from Redis when a route asks; a synchronous request waits on its mirror's future.
- Redis away: submissions and reads are 503 (ServerError) naming it; workers retry; a job that finishes while
  Redis is away is written when it is back. Redis itself should persist (appendonly) to keep what it acknowledged.
"""

from orchestrator.shared.queue import SharedQueue

__all__ = ["SharedQueue"]
