-- wrk script: POST /order with a fresh order_id each time; prints a JSON summary at the end.
-- FAIL_FRACTION (env) makes that share of orders fail at a random step.
local fail_fraction = tonumber(os.getenv("FAIL_FRACTION") or "0")
local steps = {"payment", "vendor", "courier"}
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(tid * 7919)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local fail = ""
  if math.random() < fail_fraction then
    fail = ', "fail_step": "' .. steps[math.random(3)] .. '"'
  end
  local body = string.format('{"order_id": "bench-%d-%06d", "amount": 1%s}', tid, counter % 1000000, fail)
  return wrk.format(nil, "/order", nil, body)
end

function done(summary, latency, requests)
  local p = function(q) return latency:percentile(q) / 1000 end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_s": %.3f, "rps": %.1f, "p50_ms": %.2f, "p90_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, "errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    p(50), p(90), p(99), latency.max / 1000,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
end
