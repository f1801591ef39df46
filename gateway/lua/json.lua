-- A small JSON reader and writer, shared by the gateway's Lua filters. String contents are
-- skipped with string.find (a base64 ZIP of tens of MB is one call), never char by char.

local find, sub, byte, char, format = string.find, string.sub, string.byte, string.char, string.format
local concat = table.concat

-- A malformed document: raised with error() as a table, caught with pcall.
local function malformed(what, pos)
  error({json = true, message = format("%s at byte %d", what, pos)}, 0)
end

local function skip_space(s, i)
  local _, e = find(s, "^[ \t\r\n]*", i)
  return e + 1
end

-- The position after the string whose opening quote is at i. A plain find (a memchr)
-- jumps to each quote; a quote after an odd run of backslashes is escaped.
local function string_end(s, i)
  local k = i
  while true do
    k = find(s, '"', k + 1, true)
    if k == nil then malformed("unterminated string", i) end
    local b = k - 1
    while byte(s, b) == 92 do b = b - 1 end
    if (k - 1 - b) % 2 == 0 then return k + 1 end
  end
end

local escapes = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}

local function utf8(code)
  if code < 0x80 then return char(code) end
  if code < 0x800 then return char(0xC0 + math.floor(code / 0x40), 0x80 + code % 0x40) end
  if code < 0x10000 then
    return char(0xE0 + math.floor(code / 0x1000), 0x80 + math.floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
  end
  return char(0xF0 + math.floor(code / 0x40000), 0x80 + math.floor(code / 0x1000) % 0x40,
    0x80 + math.floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
end

-- The text of a string token s[i, j) (quotes included), escapes resolved.
local function unescape(s, i, j)
  local raw = sub(s, i + 1, j - 2)
  if not find(raw, "\\", 1, true) then return raw end
  raw = raw:gsub("\\u([dD][89abAB]%x%x)\\u([dD][c-fC-F]%x%x)", function(high, low)
    return utf8(0x10000 + (tonumber(high, 16) - 0xD800) * 0x400 + tonumber(low, 16) - 0xDC00)
  end)
  raw = raw:gsub("\\u(%x%x%x%x)", function(hex) return utf8(tonumber(hex, 16)) end)
  return (raw:gsub('\\(["\\/bfnrt])', escapes))
end

local json = {malformed = malformed, skip_space = skip_space, string_end = string_end, unescape = unescape}

-- The end of a number or literal starting at i (their syntax is left to the transcoder).
function json.scalar_end(s, i)
  local _, e = find(s, "^[%w%.%+%-]+", i)
  if e == nil then malformed("expected a value", i) end
  return e + 1
end

json.null = setmetatable({}, {__tostring = function() return "null" end})

-- Decodes the value at i: objects and arrays as tables, strings, numbers, booleans,
-- json.null. Returns the value and the position after it. For small documents only.
local function decode(s, i, depth)
  if depth > 64 then malformed("nesting too deep", i) end
  i = skip_space(s, i)
  local c = byte(s, i)
  if c == 123 then -- {
    local object = {}
    i = skip_space(s, i + 1)
    if byte(s, i) == 125 then return object, i + 1 end
    while true do
      if byte(s, i) ~= 34 then malformed("expected a quoted key", i) end
      local e = string_end(s, i)
      local key = unescape(s, i, e)
      i = skip_space(s, e)
      if byte(s, i) ~= 58 then malformed("expected ':'", i) end
      object[key], i = decode(s, i + 1, depth + 1)
      i = skip_space(s, i)
      c = byte(s, i)
      if c == 125 then return object, i + 1 end
      if c ~= 44 then malformed("expected ',' or '}'", i) end
      i = skip_space(s, i + 1)
    end
  elseif c == 91 then -- [
    local array = {}
    i = skip_space(s, i + 1)
    if byte(s, i) == 93 then return array, i + 1 end
    while true do
      array[#array + 1], i = decode(s, i, depth + 1)
      i = skip_space(s, i)
      c = byte(s, i)
      if c == 93 then return array, i + 1 end
      if c ~= 44 then malformed("expected ',' or ']'", i) end
      i = i + 1
    end
  elseif c == 34 then
    local e = string_end(s, i)
    return unescape(s, i, e), e
  end
  local e = json.scalar_end(s, i)
  local word = sub(s, i, e - 1)
  if word == "true" then return true, e end
  if word == "false" then return false, e end
  if word == "null" then return json.null, e end
  local number = tonumber(word)
  if number == nil then malformed("expected a value", i) end
  return number, e
end

-- Decodes a whole document; nil and a message when it is not JSON.
function json.decode(s)
  local ok, value, i = pcall(decode, s, 1, 0)
  if not ok then
    if type(value) == "table" and value.json then return nil, value.message end
    error(value, 0)
  end
  if skip_space(s, i) <= #s then return nil, format("unexpected text after the value at byte %d", i) end
  return value
end

local quoted = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
                ["\r"] = "\\r", ["\t"] = "\\t"}

function json.quote(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return quoted[c] or format("\\u%04x", byte(c)) end) .. '"'
end

-- Encodes strings, numbers, booleans, json.null, arrays (tables with [1]) and objects
-- (other tables, keys sorted so the output is stable; an empty table is {}).
function json.encode(value)
  local kind = type(value)
  if kind == "string" then return json.quote(value) end
  if kind == "number" then
    return value == math.floor(value) and format("%d", value) or format("%.17g", value)
  end
  if kind == "boolean" then return tostring(value) end
  if value == json.null then return "null" end
  local parts = {}
  if value[1] ~= nil then
    for k = 1, #value do parts[k] = json.encode(value[k]) end
    return "[" .. concat(parts, ",") .. "]"
  end
  local keys = {}
  for key in pairs(value) do keys[#keys + 1] = key end
  table.sort(keys)
  for k, key in ipairs(keys) do parts[k] = json.quote(key) .. ":" .. json.encode(value[key]) end
  return "{" .. concat(parts, ",") .. "}"
end

return json
