-- Which CA signed each certificate: SHA-256 of the CA certificate's DER, lowercase hex. At start the MQTT front
-- door loads the active certificates of the CA it serves with into memory, so a device presenting one of them
-- (byte for byte) needs no chain verification and no registry query on CONNECT. Certificates recorded before
-- this column existed have NULL here and are verified as before.
ALTER TABLE certificates ADD COLUMN issuer_sha256 TEXT;
