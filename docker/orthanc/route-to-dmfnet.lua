-- Orthanc routes every stable study that has an MR series to the DM-FNet DICOM node (dmfnet pacs listen):
-- its MR, PT, NM and CT series, by C-STORE to the modality "dmfnet" (DicomModalities in Orthanc's config).
-- A study that already holds a derived (OT) series is not routed again: the node's answer is in it.
-- StableAge (seconds without a new instance) decides when a study is stable.
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local hasMr, sources = false, {}
  for i, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if modality == 'OT' then return end
    if modality == 'MR' then hasMr = true end
    if modality == 'MR' or modality == 'PT' or modality == 'NM' or modality == 'CT' then
      table.insert(sources, s['ID'])
    end
  end
  if hasMr then
    RestApiPost('/modalities/dmfnet/store', DumpJson(sources, true))
  end
end
