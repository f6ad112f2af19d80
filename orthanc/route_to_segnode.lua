-- Orthanc -> segnode routing.
--
-- Every series that becomes stable in Orthanc is sent to segnode by C-STORE, as an asynchronous
-- Orthanc job (POST /modalities/<segnode>/store), unless it is one of segnode's own results (or a
-- non-image object segnode has no use for). segnode writes its DICOM-SEG and SR back into this
-- Orthanc; Orthanc then fires OnStableSeries for those series too, and this script must never
-- forward them, or results would loop between the two.
--
-- A series counts as segnode's own output when any of these holds:
--   * Manufacturer (0008,0070) is "segnode" (what pipelines/outputs writes on every result);
--   * it arrived over DICOM from segnode's AE title (series metadata RemoteAET);
--   * its SOP class is a segmentation / structured report / secondary capture class AND its
--     manufacturer model name starts with "segnode" (belt and braces for edited headers).
-- Series whose modality is in Segnode.SkipModalities (SEG, SR, KO, PR, ...) are not forwarded either.
--
-- The decision for each series is written to the series' user metadata "SegnodeRouting"
-- ("forwarded job=<id>" or "skipped: <reason>"), so it can be audited from Orthanc's REST API
-- (GET /series/<id>/metadata/SegnodeRouting) and tests can wait on it instead of sleeping.
--
-- Settings come from the "Segnode" section of Orthanc's configuration file:
--   "Segnode": { "Modality": "segnode", "AET": "SEGNODE", "Manufacturer": "segnode",
--                "SkipModalities": ["SEG", "SR", ...] }
-- "Modality" is the name of segnode's entry in "DicomModalities".

local RESULT_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.66.4'] = true,   -- Segmentation Storage
  ['1.2.840.10008.5.1.4.1.1.66.7'] = true,   -- Label Map Segmentation Storage
  ['1.2.840.10008.5.1.4.1.1.88.11'] = true,  -- Basic Text SR
  ['1.2.840.10008.5.1.4.1.1.88.22'] = true,  -- Enhanced SR
  ['1.2.840.10008.5.1.4.1.1.88.33'] = true,  -- Comprehensive SR
  ['1.2.840.10008.5.1.4.1.1.88.34'] = true,  -- Comprehensive 3D SR
  ['1.2.840.10008.5.1.4.1.1.7'] = true,      -- Secondary Capture (previews)
}

local function settings()
  local config = GetOrthancConfiguration()
  local s = config['Segnode'] or {}
  local skip = {}
  for _, m in ipairs(s['SkipModalities'] or { 'SEG', 'SR', 'KO', 'PR' }) do
    skip[string.upper(m)] = true
  end
  return {
    modality = s['Modality'] or 'segnode',
    aet = string.upper(s['AET'] or 'SEGNODE'),
    manufacturer = string.lower(s['Manufacturer'] or 'segnode'),
    skip = skip,
  }
end

local function trim(value)
  if value == nil then
    return ''
  end
  return (string.gsub(tostring(value), '^%s*(.-)%s*$', '%1'))
end

local function note(seriesId, text)
  -- The metadata write is best effort: the routing decision is also in Orthanc's log.
  pcall(RestApiPut, '/series/' .. seriesId .. '/metadata/SegnodeRouting', text, true)
  print('segnode routing: series ' .. seriesId .. ': ' .. text)
end

-- The first instance's SOP class and manufacturer model name (both are instance-level in Orthanc).
local function first_instance(seriesId)
  local ok, answer = pcall(RestApiGet, '/series/' .. seriesId .. '/instances', true)
  if not ok or answer == nil then
    return nil
  end
  local instances = ParseJson(answer)
  if instances == nil or instances[1] == nil then
    return nil
  end
  local id = instances[1]['ID']
  local found, sopClass = pcall(RestApiGet, '/instances/' .. id .. '/metadata/SopClassUid', true)
  local tagsOk, tags = pcall(RestApiGet, '/instances/' .. id .. '/simplified-tags', true)
  local simplified = {}
  if tagsOk and tags ~= nil then
    simplified = ParseJson(tags) or {}
  end
  return {
    sopClass = found and trim(sopClass) or trim(simplified['SOPClassUID']),
    model = trim(simplified['ManufacturerModelName']),
  }
end

-- Why this series must not go to segnode, or nil when it should.
local function skip_reason(seriesId, tags, metadata, s)
  local manufacturer = string.lower(trim(tags['Manufacturer']))
  if manufacturer == s.manufacturer then
    return "segnode's own result (Manufacturer " .. trim(tags['Manufacturer']) .. ')'
  end
  local remoteAet = ''
  if metadata ~= nil then
    remoteAet = string.upper(trim(metadata['RemoteAET']))
  end
  if remoteAet == '' then
    local ok, value = pcall(RestApiGet, '/series/' .. seriesId .. '/metadata/RemoteAET', true)
    if ok and value ~= nil then
      remoteAet = string.upper(trim(value))
    end
  end
  if remoteAet == s.aet then
    return "segnode's own result (sent by AE " .. remoteAet .. ')'
  end
  local modality = string.upper(trim(tags['Modality']))
  local first = first_instance(seriesId)
  if first ~= nil and RESULT_SOP_CLASSES[first.sopClass]
      and string.sub(string.lower(first.model), 1, string.len(s.manufacturer)) == s.manufacturer then
    return "segnode's own result (SOP class " .. first.sopClass .. ', model ' .. first.model .. ')'
  end
  if s.skip[modality] then
    return 'modality ' .. modality .. ' is not forwarded (Segnode.SkipModalities)'
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local s = settings()
  local reason = skip_reason(seriesId, tags, metadata, s)
  if reason ~= nil then
    note(seriesId, 'skipped: ' .. reason)
    return
  end
  local request = DumpJson({ Resources = { seriesId }, Synchronous = false }, true)
  local ok, answer = pcall(RestApiPost, '/modalities/' .. s.modality .. '/store', request, true)
  if not ok or answer == nil then
    note(seriesId, 'failed: could not queue the C-STORE to modality ' .. s.modality .. ': ' .. tostring(answer))
    return
  end
  local job = ParseJson(answer)
  note(seriesId, 'forwarded job=' .. tostring(job['ID']) .. ' to ' .. s.modality)
end

-- A forward that failed (segnode down or refusing) is recorded on the series; Orthanc keeps the job
-- in GET /jobs, and POST /jobs/<id>/resubmit sends it again (see orthanc/README.md).
function OnJobFailure(jobId)
  local ok, answer = pcall(RestApiGet, '/jobs/' .. jobId, true)
  if not ok or answer == nil then
    return
  end
  local job = ParseJson(answer)
  local content = job['Content'] or {}
  local s = settings()
  if job['Type'] ~= 'DicomModalityStore' or string.upper(trim(content['RemoteAet'])) ~= s.aet then
    return
  end
  for _, seriesId in ipairs(content['ParentResources'] or {}) do
    note(seriesId, 'failed: job=' .. jobId .. ' to ' .. s.modality .. ': ' .. trim(job['ErrorDescription'])
      .. ' (POST /jobs/' .. jobId .. '/resubmit to retry)')
  end
end
