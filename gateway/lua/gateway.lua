-- Runs in Envoy before the transcoder: checks X-Key on the finetune routes, and on the
-- way out applies the status a service asked for with the x-http-status header.

-- Loaded once per worker: the accepted keys, one per line.
local api_keys = {}
local keys_file = "@API_KEYS_FILE@"
if keys_file ~= "" then
  local f = io.open(keys_file, "r")
  if f then
    for line in f:lines() do
      local key = line:match("^%s*(.-)%s*$")
      if key ~= "" then api_keys[key] = true end
    end
    f:close()
  end
end

local key_prefix = "@API_KEY_PREFIX@"
-- Native gRPC paths of the same RPCs.
local guarded_grpc = { @API_KEY_GRPC_PATHS@ }

local function refuse(handle, status, code, message)
  handle:respond(
    {[":status"] = tostring(status), ["content-type"] = "application/json"},
    string.format('{"code":%d,"message":"%s","details":[]}', code, message))
end

function envoy_on_request(handle)
  local path = (handle:headers():get(":path") or ""):match("^[^?]*")
  if path:sub(1, #key_prefix) == key_prefix or guarded_grpc[path] then
    local key = handle:headers():get("x-key")
    if key == nil or key == "" then
      return refuse(handle, 401, 16, "the X-Key header is required on " .. key_prefix .. " routes")
    end
    if not api_keys[key] then
      return refuse(handle, 403, 7, "the X-Key header does not hold an accepted API key")
    end
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get("x-http-status")
  if status == nil then return end
  headers:remove("x-http-status")
  -- Native gRPC answers keep HTTP 200; REST answers take the documented status.
  local content_type = headers:get("content-type") or ""
  if content_type:sub(1, 16) ~= "application/grpc" and status:match("^%d%d%d$") then
    headers:replace(":status", status)
  end
end
