"""A fake GitHub for tests: the REST API and the Actions service's runner scale set API.

``FakeGitHub`` is a real HTTP/1.1 server on loopback (a random port by default) that speaks the
runner scale set wire protocol (as the Go client actions/scaleset v0.4.0 uses it) closely enough
for a client written against the real service, and simulates jobs end to end with a runner agent
(``outrunner.testing.agent`` or the busybox script ``outrunner/testing/agent.sh``)::

    with FakeGitHub(long_poll_timeout=0.5) as gh:  # or: async with FakeGitHub() as gh
        # Point the scale set client at gh.config_url() (http://127.0.0.1:PORT/octo-org, GHES
        # mode) with any token, run the listener; its runners get gh's JIT configs.
        job = gh.queue_job(["linux"], duration=0.1)
        gh.wait_until_jobs_completed(1)
        assert gh.job(job).result == "succeeded"

It runs in background threads, so it serves sync and async tests alike; ``stop()`` (or leaving the
``with``) wakes long polls, closes every connection and joins every thread within about a second.

Constructor (all keyword-only)
------------------------------
``host="127.0.0.1"``, ``port=0``; ``long_poll_timeout=50.0`` (seconds a message GET is held before
202; use ~0.3 in tests); ``admin_token_ttl=600.0`` (the admin JWT's lifetime: under 60 s the client
refreshes before every call); ``queue_token_ttl=3600.0``; ``pat=None`` (when set, registration-token
requires ``Bearer <pat>`` or an installation token issued by the fake; when None any non-empty
token is accepted); ``acquire_mode=False`` (older-GHES flow, below); ``owner="octo-org"``,
``repo=None`` (the org/repo the REST side knows: other orgs answer 404; enterprises are always
known); ``remove_agent_on_completion=True``; ``message_queue_query=None`` (e.g. ``"sig=abc"``: the
``messageQueueUrl`` then carries that query and message GET/DELETE answer 400 without it, which
checks that the client merges ``lastMessageId`` into an existing query); ``app_client_id=None`` and
``app_installation_id=None`` (when set, the App JWT's ``iss`` and the installation id must match;
without ``add_app`` only); ``installation_token_ttl=3600.0`` (seconds an App installation token
lives; shorten it to test refreshing); ``session_idle_timeout=None`` (seconds; when set, a
session that has not polled for that long, counting from the end of its last message GET, or from
its creation, expires as with ``expire_sessions()``: see Sessions below).

Addresses: ``gh.url`` (``http://127.0.0.1:PORT``), ``gh.api_url`` (``<url>/api/v3``),
``gh.base_url`` (Actions service, ``<url>/tenant/1``; runner-registration returns it with a trailing
``/`` and clients must keep the ``/tenant/1`` prefix), ``gh.config_url(scope=None)``.

Routes
------
GitHub REST API (GHES mode, so under ``/api/v3``; errors are ``{"message", "documentation_url"}``):

* ``POST /api/v3/{orgs/O | repos/O/R | enterprises/E}/actions/runners/registration-token``
  (REGISTRATION_TOKEN): ``Authorization: Bearer <PAT or installation token>`` (or ``token ...``);
  201 ``{"token", "expires_at"}``; 401 bad credentials; 404 unknown org or repo.
* ``POST /api/v3/app/installations/{id}/access_tokens`` (APP_ACCESS_TOKEN): ``Bearer <App JWT>``
  with 3 segments, ``alg`` RS256, numeric ``iat`` and ``exp``, ``iat`` not in the future, ``exp``
  in the future and at most 10 min ahead (of now and of ``iat``; 60 s of clock slack each), ``iss``
  present; 201 ``{"token": "ghs_...", "expires_at"}`` (``installation_token_ttl`` from now); 401
  with GitHub's reason ("A JSON web token could not be decoded", "'Expiration time' claim
  ('exp') is too far in the future", ...). Once an App is registered with ``add_app``, the JWT
  must also name one in ``iss`` (401 "Integration not found") and carry its RS256 signature
  (401 "A JSON web token could not be decoded"; verified with PyJWT, the ``app`` extra), and the
  installation must be that App's (404 "Not Found"); a suspended one answers 403. Without
  ``add_app`` the signature is not checked (and PyJWT is not needed).
* ``POST /api/v3/actions/runner-registration`` (RUNNER_REGISTRATION):
  ``Authorization: RemoteAuth <registration token>``; body ``{"url": <config URL>,
  "runner_event": "register"}`` whose path must name the token's scope; 201 ``{"url": "<base>/",
  "token": <admin JWT: alg RS256, numeric exp = now + admin_token_ttl>}``; 401; 400.

Actions service, under ``<base>/_apis/``. Every call needs ``?api-version=6.0-preview`` (400
otherwise) and ``Authorization: Bearer <admin token>`` that the fake issued and that has not expired
(401 otherwise). Errors are ``{"typeName": "<Namespace>.<Exception>, <Namespace>", "message"}``;
lists are ``{"count", "value"}``:

* ``GET runtime/runnerscalesets?runnerGroupId=&name=`` (GET_SCALE_SET): list, 200.
* ``GET runtime/runnerscalesets/{id}`` (GET_SCALE_SET_BY_ID): 200; 404
  ``RunnerScaleSetNotFoundException``.
* ``POST runtime/runnerscalesets`` (CREATE_SCALE_SET): 200 with ``id``, ``createdOn``,
  ``runnerGroupName``, ``runnerSetting`` (camelCase, as the .NET service writes it) and
  ``statistics``; no labels -> ``[{"type": "System", "name": <name>}]``; 409
  ``RunnerScaleSetExistsException`` for a name taken in the group; 400 ``ArgumentException``
  without a name; 404 ``RunnerGroupNotFoundException``.
* ``PATCH runtime/runnerscalesets/{id}`` (UPDATE_SCALE_SET): 200; read-only fields are ignored.
* ``DELETE runtime/runnerscalesets/{id}`` (DELETE_SCALE_SET): 204; its sessions, queue and runners
  go too; its unstarted jobs are queued again, its running jobs end ``canceled``.
* ``GET runtime/runnergroups/?groupName=`` (GET_RUNNER_GROUP, trailing slash required): list;
  ``default`` is id 1 with ``isDefaultGroup: true``; see ``add_runner_group``.
* ``POST runtime/runnerscalesets/{id}/generatejitconfig`` (GENERATE_JIT), body ``{"name",
  "workFolder"}``: 200 ``{"runner": {"id", "name", "runnerScaleSetId"}, "encodedJITConfig"}``; 409
  ``AgentExistsException`` when the name is taken.
* ``GET distributedtask/pools/0/agents/{id}`` (GET_RUNNER), ``GET ...agents?agentName=``
  (LIST_RUNNERS): 200 / 404 ``AgentNotFoundException``.
* ``DELETE distributedtask/pools/0/agents/{id}`` (DELETE_RUNNER): 204; 404
  ``AgentNotFoundException``; 409 ``JobStillRunningException`` while its job runs.
* ``POST runtime/runnerscalesets/{id}/sessions`` (CREATE_SESSION), body ``{"ownerName"}``: 200 full
  session (``sessionId``, ``ownerName``, ``runnerScaleSet``, ``messageQueueUrl``,
  ``messageQueueAccessToken``, ``statistics``); 409 ``RunnerScaleSetSessionConflictException`` with
  "The actions runner scaleset <name> already has an active session." while one is open.
* ``PATCH .../sessions/{sessionId}`` (REFRESH_SESSION): 200 full session with a new queue token;
  ``DELETE`` (DELETE_SESSION): 204. Unknown session: 400 ``RunnerScaleSetSessionExpiredException``.
  Sessions end when deleted, with ``expire_sessions()``, or after ``session_idle_timeout`` seconds
  without a message GET (a GET being held counts as polling): then their queue URL answers 404,
  refresh and delete 400 ``RunnerScaleSetSessionExpiredException``, a new session may be created
  (no 409), and it gets the scale set's undeleted messages, including those emitted meanwhile.
* ``POST runtime/runnerscalesets/{id}/acquirejobs`` (ACQUIRE_JOBS), body ``[runnerRequestId, ...]``,
  authenticated with the **message-queue token** (an admin token gets 401): 200 list of the ids
  acquired (ids not offered to this scale set, or already taken, are left out).

Message queue, at the session's absolute ``messageQueueUrl`` (``<url>/queue/<sessionId>``, no
trailing slash), ``Authorization: Bearer <messageQueueAccessToken>`` (wrong or expired: 401, plain
text; session gone: 404):

* ``GET`` (GET_MESSAGE), optional ``lastMessageId``, header ``X-ScaleSetMaxCapacity``: the oldest
  undeleted message with an id above ``lastMessageId`` at once, else held up to
  ``long_poll_timeout`` and then 202 with an empty body. 200 answers are ``{"messageId",
  "messageType": "RunnerScaleSetJobMessages", "body": "<JSON array as a string>", "statistics"}``
  with statistics current at delivery. Ids grow monotonically from 100000000. Job messages are
  batched, at most 50 per message; a message never changes once delivered, and is delivered again
  until deleted. The queue belongs to the scale set: messages emitted while no session is open go to
  the next session.
* ``DELETE /<messageId>`` (DELETE_MESSAGE): 204, also for a message already deleted; 404 for an id
  never issued to that scale set.

Job simulation
--------------
``queue_job(labels)`` queues a job (state ``queued``). It is routed to a scale set whose label names
include every job label (case-insensitive, like GitHub; lowest scale set id first) and which has a
session that has polled at least once, while that scale set holds fewer not-yet-completed jobs than
the session's last ``X-ScaleSetMaxCapacity`` (no header: no limit). Before the first poll the
capacity is unknown, so nothing is routed; the first poll routes the backlog and returns it at once.
Jobs with no matching scale set wait, and are routed when one appears or its labels change.

* Hosted style (default): routed jobs become ``assigned`` and emit ``JobAssigned``.
* ``acquire_mode=True`` (older GHES): routed jobs become ``available`` and emit ``JobAvailable``
  with ``acquireJobUrl``; ``acquirejobs`` with their ids assigns them (``JobAssigned``).
* A runner agent connecting with a JIT config of the scale set takes its oldest assigned job:
  ``running``, ``JobStarted {runnerId, runnerName}``. When it reports, the job is ``completed`` and
  ``JobCompleted {result, runnerId, runnerName}`` is emitted; the runner is then deleted server-side
  like a real ephemeral JIT runner (unless ``remove_agent_on_completion=False``), and queued jobs
  may be routed into the freed capacity.

Job messages carry runnerRequestId, repositoryName, ownerName, jobId (a UUID string),
jobWorkflowRef, jobDisplayName, workflowRunId, eventName, requestLabels, and the timestamps
queueTime, scaleSetAssignTime, runnerAssignTime, finishTime (RFC 3339 UTC, ``null`` until
meaningful). Statistics per scale set: totalAvailableJobs (offered, not acquired),
totalAcquiredJobs (acquired, not completed), totalAssignedJobs (assigned or running),
totalRunningJobs, totalRegisteredRunners, totalBusyRunners (running a job), totalIdleRunners
(registered minus busy).

Runner agent protocol
---------------------
``encodedJITConfig`` is standard base64 of a flat, compact JSON object::

    {"url":"http://127.0.0.1:PORT","runner_id":1,"runner_name":"r-1a2b3c4d","scale_set_id":1,
     "credential":"jit_..."}

``outrunner.testing.agent.run_agent``, ``python -m outrunner.testing.agent --jitconfig X`` and
the busybox script ``outrunner.testing.agent.SHELL_AGENT`` (``agent.sh``) implement the runner
side; the commands also read ``$ACTIONS_RUNNER_INPUT_JITCONFIG`` like the real runner. Like the real
runner with its broker connection, they retry a call that gets a 5xx answer or no answer
(connection refused or reset) after 0.2 s, doubling up to 2 s, for up to ``retry_for`` seconds
from its first failure (``--retry-for``, default 600, 0: never); 4xx answers are final. Both agent
calls send ``Authorization: Bearer <credential>`` and a form body:

* ``POST <url>/_agent/connect`` (AGENT_CONNECT), body ``wait=<seconds>`` (default
  ``long_poll_timeout``, at most 300) and ``session=<any string the agent run keeps>``
  (optional): 200 ``text/plain`` lines ``job_id=``, ``runner_request_id=``, ``runner_id=``,
  ``runner_name=``, ``duration=`` (seconds to "run"), ``result=`` (to report),
  ``display_name=``; or 204 after ``wait`` seconds without a job: connect again. The same job
  again when the session that took it connects again while it runs (its answer may have been
  lost, as a real runner's unacknowledged message is delivered again). 401 unknown credential;
  409 the one-time credential was already used (the runner took a job, and this connect is not
  that run's); 404 the runner was removed.
* ``POST <url>/_agent/complete`` (AGENT_COMPLETE), body ``job_id=<job_id>&result=<result>``: 200
  ``ok``; 409 when that job is not running on this runner (e.g. ``cancel_job``); 404 runner removed.

Test controls and inspection
----------------------------
* ``queue_job(labels=("linux",), *, duration=0.0, result="succeeded", repository="repo",
  owner=None, workflow="ci.yml", display_name=None, event_name="push") -> int`` (the
  runnerRequestId); ``assign_job(scale_set_id, *, duration=0.0, display_name=None) -> int`` (a
  job already assigned to that scale set, for runners registered without a listener);
  ``cancel_job(id)``; ``add_runner_group(name) -> int``;
  ``create_scale_set(name, labels, *, runner_group_id=1) -> int`` and
  ``generate_jit_config(scale_set_id, runner_name) -> str`` (shortcuts past HTTP);
  ``remove_runner(name) -> bool`` (as an administrator: its agent's connect gets 404 at once;
  ``ApiError`` 409 while it runs a job).
* ``jobs()``, ``job(id)`` -> ``JobInfo``; ``runners()`` -> ``RunnerInfo`` (id, name, scale set,
  status, job) of the runners registered now (removed ones are gone); ``runner(name)`` -> the one
  with that name (case-insensitive) or None, e.g. ``assert gh.runner("r-1") is None`` once its
  environment is gone; ``scale_sets()`` -> ``ScaleSetInfo``; ``sessions()`` -> ``SessionInfo``;
  ``statistics(scale_set_id)`` -> ``Statistics``.
* ``requests`` (every request as ``RecordedRequest``: endpoint, method, path, query, auth scheme and
  whether the credential was accepted (never the secret), selected headers, parsed body, status
  (None: closed without an answer), applied fault: ``"fail"``, ``"delay"``, ``"drop"`` or
  ``"outage"``), ``requests_to(endpoint)``, ``clear_requests()``.
* ``wait_for(predicate, timeout=10)``, ``wait_until_jobs_completed(n, timeout=10)`` and their
  ``..._async`` twins for event-loop tests; they raise ``TimeoutError``.
* GitHub Apps: ``add_app(client_id, installation_id, public_key_pem, *, app_id=None) ->
  FakeApp``; ``generate_key_pair(bits=2048) -> (private_pem, public_pem)`` (module function);
  ``suspend_app_installation(id, suspended=True)``; ``expire_installation_tokens()``.
* ``expire_admin_tokens()``, ``expire_queue_tokens()``, ``expire_sessions()``;
  ``revoke_credentials()`` (the PAT or App is revoked: registration-token answers 401 and every
  admin and queue token issued so far stops working).
* Fault injection by ``Endpoint`` (or its string value), consumed one per request in FIFO order:
  ``fail_next(endpoint, times=1, status=503, body=None, headers=None)`` answers without handling
  (``body``: mapping -> JSON, str -> text/plain, bytes -> raw, None -> a typeName/message JSON
  error; ``headers`` e.g. ``{"Retry-After": "2"}``); ``delay_next(endpoint, seconds, times=1)``
  holds the request, then handles it; ``drop_next(endpoint, times=1)`` closes the connection
  without an answer and without handling it. ``pending_faults(endpoint)``, ``clear_faults()``.
* Outages: ``outage(status=503, *, endpoints=None, include_agents=False, headers=None) -> Outage``
  starts one at once; end it with ``.end()`` (idempotent, non-blocking) or use it as
  ``with gh.outage(): ...`` (also fine in async tests). While it lasts, every request to its
  endpoints is answered ``status`` without being handled, with the error body of the service
  behind the endpoint (REST ``{"message", "documentation_url"}``, Actions service and queue
  ``{"typeName", "message"}``, agent plain text) plus ``headers``; ``status=None`` closes the
  connection without an answer instead (a reset, as far as the client can tell). Message GETs,
  agent connects and delayed requests of those endpoints that are open when it starts get that
  answer at once (within milliseconds). Such requests are logged with ``fault="outage"``;
  pending faults are not consumed meanwhile. ``endpoints`` defaults to every endpoint of the REST
  API, the Actions service and the message queue; ``include_agents=True`` adds AGENT_CONNECT and
  AGENT_COMPLETE. Left out by default because the real runner talks to another service (its
  broker) than the scale set client does: jobs keep running and completing during an outage, and
  their JobStarted/JobCompleted wait in the scale set's queue for the listener's next successful
  poll, in the same session if it survived (see ``session_idle_timeout``), else in a new one.
  ``Outage.active``, ``.status``, ``.endpoints``, ``.duration``. Outages may overlap; the oldest
  active one answers.
"""

from outrunner.testing.fakegithub.apps import FakeApp, generate_key_pair
from outrunner.testing.fakegithub.endpoints import Endpoint
from outrunner.testing.fakegithub.model import (
    JobInfo,
    JobState,
    RecordedRequest,
    RunnerInfo,
    RunnerStatus,
    ScaleSetInfo,
    SessionInfo,
    Statistics,
)
from outrunner.testing.fakegithub.outage import Outage
from outrunner.testing.fakegithub.server import FakeGitHub

__all__ = [
    "Endpoint",
    "FakeApp",
    "FakeGitHub",
    "JobInfo",
    "JobState",
    "Outage",
    "RecordedRequest",
    "RunnerInfo",
    "RunnerStatus",
    "ScaleSetInfo",
    "SessionInfo",
    "Statistics",
    "generate_key_pair",
]
