-- The first filter, so every answer passes it on the way out, Envoy's own refusals
-- included. On the way in it finds the REST binding of the request and records it (and its
-- error style) in the stream's metadata for the later filters; on the way out it applies
-- the status a service asked for with x-http-status, and gives error answers the terms of
-- the route's seed document. CONFIG (rendered by gateway/envoy_config.py):
--   exact["VERB /path"], templates {verb, Lua pattern, route}   the REST bindings
--   routes[route] = {style, body = "*" | field | "", params = {path variable = true}}
--   segment_styles[first path segment]   the style of a path no binding matches

local find, sub = string.find, string.sub

local function route_of(verb, path)
  local route = CONFIG.exact[verb .. " " .. path]
  if route then return route end
  for _, t in ipairs(CONFIG.templates) do
    if t[1] == verb and find(path, t[2]) then return t[3] end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if sub(headers:get("content-type") or "", 1, 16) == "application/grpc" then return end
  local path = (headers:get(":path") or ""):match("^[^?]*")
  if #path > 1 and sub(path, -1) == "/" then path = sub(path, 1, -2) end -- as the transcoder does
  local route = route_of(headers:get(":method") or "", path)
  local style = route and CONFIG.routes[route].style or CONFIG.segment_styles[path:match("^/([^/]*)") or ""]
  local meta = handle:streamInfo():dynamicMetadata()
  if route then meta:set("loramesh", "route", route) end
  if style then meta:set("loramesh", "style", style) end
end

-- loc items of a field path ("loras[0].scale" -> "loras", 0, "scale") after where it was sent.
local function loc(field, route)
  local items = {}
  for part in field:gsub("%[(%d+)%]", ".%1"):gmatch("[^.]+") do
    items[#items + 1] = part:match("^%d+$") and tonumber(part) or part
  end
  local first = items[1]
  local where = "body"
  if first and route.params[first] then
    where = "path"
  elseif route.body == "" or (route.body ~= "*" and first ~= route.body) then
    where = "query"
  end
  table.insert(items, 1, where)
  return items
end

-- FastAPI's validation errors from a google.rpc.BadRequest detail, or nil when there is none.
local function validation_errors(details, route)
  local errors = {}
  for _, detail in ipairs(type(details) == "table" and details or {}) do
    if type(detail) == "table" and detail["@type"] == "type.googleapis.com/google.rpc.BadRequest" then
      for _, v in ipairs(detail.field_violations or detail.fieldViolations or {}) do
        errors[#errors + 1] = {loc = loc(tostring(v.field or ""), route), msg = tostring(v.description or ""),
                               type = "value_error"}
      end
    end
  end
  return #errors > 0 and errors or nil
end

-- A refusal without field violations (the transcoder's "steps: invalid value 1.5 for type
-- TYPE_INT32", a body that is not a JSON object) as FastAPI's single validation error.
local function message_errors(message, route)
  local field, rest = message:match("^([%w_]+[%w_%.%[%]]*): (.+)$")
  if field then return {{loc = loc(field, route), msg = rest, type = "type_error"}} end
  return {{loc = {"body"}, msg = (message:gsub("^:%s*", "")), type = "value_error"}}
end

-- The error body in the route's own terms (and its new status), or nil to leave it.
local function restyle(text, status, meta)
  local status_body = json.decode(text)
  if type(status_body) ~= "table" or type(status_body.message) ~= "string" then return nil end
  local head = text:match("^(.*)}%s*$")
  local message = status_body.message
  if meta.style == "generation" then
    return status, head .. ',"error":' .. json.quote(message) .. "}"
  end
  -- fastapi
  local route = meta.route and CONFIG.routes[meta.route]
  local errors = status == 400 and status_body.code == 3 and route
    and (validation_errors(status_body.details, route) or message_errors(message, route))
  if errors then return 422, head .. ',"detail":' .. json.encode(errors) .. "}" end
  return status, head .. ',"detail":' .. json.quote(message) .. "}"
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  local asked = headers:get("x-http-status")
  if asked ~= nil then
    headers:remove("x-http-status")
    -- Native gRPC answers keep HTTP 200; REST answers take the documented status.
    if sub(content_type, 1, 16) ~= "application/grpc" and asked:match("^%d%d%d$") then
      headers:replace(":status", asked)
    end
  end
  local status = tonumber(headers:get(":status")) or 0
  local plain = sub(content_type, 1, 10) == "text/plain"
  if status < 400 or not (plain or sub(content_type, 1, 16) == "application/json") then return end
  local meta = handle:streamInfo():dynamicMetadata():get("loramesh") or {}
  if meta.style == nil and not plain then return end
  local body = handle:body()
  if body == nil or body:length() > 65536 then return end
  local text = body:getBytes(0, body:length())
  if plain then
    -- Some refusals of the transcoder (a path value that contradicts the body) skip the
    -- local reply mappers: they become a Status like every other error.
    text = '{"code":' .. (CONFIG.codes[tostring(status)] or 2) .. ',"message":' .. json.quote(text) ..
           ',"details":[]}'
  end
  local new_status = status
  if meta.style ~= nil then
    local restyled_status, restyled = restyle(text, status, meta)
    if restyled then new_status, text = restyled_status, restyled end
  end
  body:setBytes(text)
  headers = handle:headers() -- the one taken before body() is no longer usable
  if plain then headers:replace("content-type", "application/json") end
  headers:replace("content-length", tostring(#text))
  if new_status ~= status then headers:replace(":status", tostring(new_status)) end
end
