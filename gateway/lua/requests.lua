-- Runs after the auth filters, before the transcoder: the X-Key check on the finetune
-- routes, then, for a REST request with a body, its content type and its field names.
-- CONFIG (rendered by gateway/envoy_config.py from the descriptor set):
--   api_keys_file, key_prefix, guarded_grpc  the X-Key check
--   bodies[route]    the message a route's JSON body fills (0: JSON not checked by name)
--   messages[k]      {names = "what is allowed", fields = {json name = 0 | k | -k}}:
--                    0 any value, k message k (an object or a list of them), -k a map of them

-- Loaded once per worker: the accepted keys, one per line.
local api_keys = {}
if CONFIG.api_keys_file ~= "" then
  local f = io.open(CONFIG.api_keys_file, "r")
  if f then
    for line in f:lines() do
      local key = line:match("^%s*(.-)%s*$")
      if key ~= "" then api_keys[key] = true end
    end
    f:close()
  end
end

local byte, find, sub = string.byte, string.find, string.sub
local skip_space, string_end, scalar_end = json.skip_space, json.string_end, json.scalar_end
local MAX_REPORTED = 20

-- A refusal whose body is already the google.rpc.Status JSON (the local reply
-- configuration leaves it as it is). Native gRPC clients get the message as grpc-message.
local function refuse(handle, status, code, message, violations)
  if sub(handle:headers():get("content-type") or "", 1, 16) == "application/grpc" then
    return handle:respond({[":status"] = tostring(status)}, message)
  end
  local details = "[]"
  if violations then
    local items = {}
    for k, v in ipairs(violations) do
      items[k] = string.format('{"field":%s,"description":%s,"reason":""}', json.quote(v[1]), json.quote(v[2]))
    end
    details = '[{"@type":"type.googleapis.com/google.rpc.BadRequest","field_violations":['
      .. table.concat(items, ",") .. "]}]"
  end
  handle:streamInfo():dynamicMetadata():set("loramesh", "status_body", true)
  handle:respond({[":status"] = tostring(status), ["content-type"] = "application/json"},
    string.format('{"code":%d,"message":%s,"details":%s}', code, json.quote(message), details))
end

local walk

-- Checks the value at i against `kind` (see CONFIG.messages); returns the position after it.
local function value(s, i, kind, path, found, depth)
  local c = byte(s, i)
  if c == 34 then return (string_end(s, i)) end
  if c ~= 123 and c ~= 91 then return scalar_end(s, i) end
  if depth > 100 then json.malformed("nesting too deep", i) end
  if c == 91 then
    local index = 0
    i = skip_space(s, i + 1)
    if byte(s, i) == 93 then return i + 1 end
    while true do
      i = skip_space(s, value(s, i, kind, path and (path .. "[" .. index .. "]"), found, depth + 1))
      c = byte(s, i)
      if c == 93 then return i + 1 end
      if c ~= 44 then json.malformed("expected ',' or ']'", i) end
      i, index = skip_space(s, i + 1), index + 1
    end
  end
  return walk(s, i, kind, path, found, depth + 1)
end

-- The object at i: each key must be a field of message `kind` (any key when kind is 0 or a
-- map); unknown ones are added to `found` under their JSON path.
walk = function(s, i, kind, path, found, depth)
  local message = kind > 0 and CONFIG.messages[kind] or nil
  local values = kind < 0 and -kind or 0
  i = skip_space(s, i + 1)
  if byte(s, i) == 125 then return i + 1 end
  while true do
    if byte(s, i) ~= 34 then json.malformed("expected a quoted key", i) end
    local e = string_end(s, i)
    local key = json.unescape(s, i, e)
    local inner = values
    local field_path = path and (path == "" and key or path .. "." .. key)
    if message then
      inner = message.fields[key]
      if inner == nil then
        if #found < MAX_REPORTED then
          found[#found + 1] = {field_path, "unknown field; allowed: " .. message.names}
        end
        inner = 0
      end
    end
    i = skip_space(s, e)
    if byte(s, i) ~= 58 then json.malformed("expected ':'", i) end
    -- Values of unchecked fields are skipped without building their paths.
    i = skip_space(s, value(s, skip_space(s, i + 1), inner, inner ~= 0 and field_path or nil, found, depth))
    local c = byte(s, i)
    if c == 125 then return i + 1 end
    if c ~= 44 then json.malformed("expected ',' or '}'", i) end
    i = skip_space(s, i + 1)
  end
end

-- The unknown fields of a JSON body for message `kind`, or nil and what is malformed.
local function unknown_fields(s, kind)
  local found = {}
  local ok, problem = pcall(function()
    local i = skip_space(s, 1)
    if i > #s then return end
    i = skip_space(s, value(s, i, kind, "", found, 0))
    if i <= #s then json.malformed("unexpected text after the value", i) end
  end)
  if ok then return found end
  if type(problem) == "table" and problem.json then return nil, problem.message end
  error(problem, 0)
end

local function is_json(content_type)
  local media = (content_type or ""):match("^%s*([^;%s]+)")
  if media == nil then return false end
  media = media:lower()
  return media == "application/json" or (find(media, "^application/[%w%.%-]+%+json$") ~= nil)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = (headers:get(":path") or ""):match("^[^?]*")
  if sub(path, 1, #CONFIG.key_prefix) == CONFIG.key_prefix or CONFIG.guarded_grpc[path] then
    local key = headers:get("x-key")
    if key == nil or key == "" then
      return refuse(handle, 401, 16, "the X-Key header is required on " .. CONFIG.key_prefix .. " routes")
    end
    if not api_keys[key] then
      return refuse(handle, 403, 7, "the X-Key header does not hold an accepted API key")
    end
  end
  local meta = handle:streamInfo():dynamicMetadata():get("loramesh")
  local kind = meta and meta.route and CONFIG.bodies[meta.route]
  if kind == nil then return end -- native gRPC, no such route, or no JSON body
  local content_type = headers:get("content-type")
  -- Waits for the whole body; wrappers taken before (headers) are no longer usable after.
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  if not is_json(content_type) then
    return refuse(handle, 415, 3, string.format(
      "the Content-Type header must be application/json (or application/*+json) for a request body; got %s",
      content_type and ("'" .. content_type:sub(1, 100) .. "'") or "none"))
  end
  if kind == 0 then return end
  local found, problem = unknown_fields(body:getBytes(0, body:length()), kind)
  if found == nil then
    return refuse(handle, 400, 3, "the request body is not valid JSON: " .. problem)
  end
  if #found > 0 then
    local parts = {}
    for k, v in ipairs(found) do parts[k] = v[1] .. ": " .. v[2] end
    return refuse(handle, 400, 3, table.concat(parts, "; "), found)
  end
end
