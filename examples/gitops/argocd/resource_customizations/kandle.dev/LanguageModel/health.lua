-- Argo CD health check for kandle's LanguageModel (group kandle.dev).
-- Healthy: Ready=True and the operator has observed the current generation.
-- Degraded: Degraded=True (the message says why: a missing token Secret, an unknown repo, ...).
-- Progressing: anything else — a new spec not yet observed, a rollout, a model still loading.
local hs = {}

local function condition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kandle operator to observe the model"
  return hs
end

if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kandle operator to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end

local ready = condition(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

hs.status = "Progressing"
local progressing = condition(status, "Progressing")
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.message
elseif progressing ~= nil and progressing.message ~= nil then
  hs.message = progressing.message
else
  hs.message = "Waiting for the model to become Ready"
end
return hs
