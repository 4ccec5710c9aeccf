#!/usr/bin/env python3
"""Regenerate fuzz/seeds/TARGET/ from real protocol traces.

Run from anywhere: python3 fuzz/tools/make_seeds.py. Seeds are small files
committed to git; the script is deterministic (same names, same bytes).
Header bytes: several targets take 1-4 leading configuration bytes (see the
target's doc comment); seeds carry a few variants of them.
"""
import base64, os, shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds")

def b64(b):
    return base64.b64encode(b)

# ---------------------------------------------------------------- IMAP client
COMMANDS = [
    # RFC 3501 / RFC 9051 examples
    b"a001 CAPABILITY\r\n",
    b"a002 NOOP\r\n",
    b"A023 LOGOUT\r\n",
    b"a002 STARTTLS\r\n",
    b"a001 LOGIN SMITH SESAME\r\n",
    b"A001 LOGIN {11}\r\nFRED FOOBAR {7}\r\nfat man\r\n",
    b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man\r\n",
    b'a LOGIN "al ice" "pa\\"ss\\\\word"\r\n',
    b'a LOGIN "" ""\r\n',
    'a LOGIN "jörg" "pässwörd"\r\n'.encode(),
    "a LOGIN jörg pässwörd\r\n".encode(),
    b"a login user@example.com p]w\n",
    b"A001 AUTHENTICATE GSSAPI\r\n",
    b"a AUTHENTICATE PLAIN\r\n",
    b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"a AUTHENTICATE PLAIN =\r\n",
    b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA\r\n",
    b"A01 AUTHENTICATE XOAUTH2 " + b64(b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01") + b"\r\n",
    b"a AUTHENTICATE OAUTHBEARER " + b64(b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01") + b"\r\n",
    b'a023 ID ("name" "sodr" "version" "19.34" "vendor" "Pink Floyd Music Limited")\r\n',
    b"a ID NIL\r\n",
    b"a ID ()\r\n",
    b'a ID ("name" {11}\r\nThunderbird "version" NIL)\r\n',
    b'5 ID ("name" "iPhone Mail" "version" "21E236" "os" "iOS" "os-version" "17.4.1 (21E236)")\r\n',
    b"A142 SELECT INBOX\r\n",
    b"a UID FETCH 1:* (FLAGS)\r\n",
    b"A003 APPEND saved-messages (\\Seen) {310}\r\n",
    b"a LOGIN {99999}\r\n",
    b"a LOGIN {18446744073709551616}\r\n",
    b"a LOGIN {4294967295+}\r\n",
    b"a X\xff\r\n",
    b"\x00bad\r\n",
    b"+ NOOP\r\n",
    b"a NOOP extra\r\n",
]

SESSION = (b"a1 CAPABILITY\r\n"
           b"a2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n"
           b"a3 LOGIN \"bob\" {3+}\r\npwd\r\n"
           b"a4 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n"
           b"a5 AUTHENTICATE PLAIN\r\n*\r\n"
           b"a6 SELECT INBOX\r\n"
           b"a7 LOGIN {99999}\r\n"
           b"a8 ID (\"name\" {3}\r\nfoo)\r\n"
           b"\0bad\r\n"
           b"a9 NOOP\n"
           b"a10 LOGOUT\r\n")
STARTTLS_SESSION = (b"a1 CAPABILITY\r\na2 LOGIN alice secret\r\na3 STARTTLS\r\n"
                    b"a4 LOGIN alice pipelined\r\n")
HANDOFF = (b"a0 CAPABILITY\r\na1 LOGIN alice secret\r\n"
           b"a2 SELECT INBOX\r\na3 APPEND INBOX {5}\r\nhel\r\na4 FETCH 1:* (FL")

# ---------------------------------------------------------------- IMAP server
RESPONSES = [
    b"* OK Gimap ready for requests from 1.2.3.4 abcdef\r\n",
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN auth=xoauth2] Dovecot ready.\r\n",
    b"* OK The Microsoft Exchange IMAP4 service is ready. [TQBXADIAUABSADAAMgBDAEEAMAAwADEAMQAuAGUAdQByAHAAcgBkADAAMgAuAHAAcgBvAGQALgBvAHUAdABsAG8AbwBrAC4AYwBvAG0A]\r\n",
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN] Dovecot (Ubuntu) ready.\r\n",
    b"* PREAUTH IMAP4rev1 server logged in as Smith\r\n",
    b"* BYE Autologout; idle for too long\r\n",
    b"* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER\r\n",
    b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\n",
    b"A1 OK [CAPABILITY IMAP4rev1 IDLE] user@example.com authenticated (Success)\r\n",
    b"A2 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n",
    b"A3 NO AUTHENTICATE failed.\r\n",
    b"A4 BAD Command Error. 12\r\n",
    b"+ eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n",
    b"+ \r\n",
    b"+ Ready for additional command text\r\n",
    b"* 3 EXISTS\r\n",
    b"* OK [ALERT] Please note\r\n",
    b"* OK [UNAVAILABLE] Temporary authentication failure\r\n",
    b'* ID ("name" "Dovecot")\r\n',
    b"* 12 FETCH (FLAGS (\\Seen) BODY[HEADER] {26}\r\nSubject: hi\r\nFrom: a@b\r\n)\r\n",
    b"A0001 OK [CAPABILITY IMAP4rev1 IDLE]  Logged in\xff\r\n",
]

# ---------------------------------------------------------------- SASL
SASL = [
    b"eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==",
    b64(b'{"status":"401","schemes":"bearer mac","scope":"https://mail.google.com/"}'),
    b64(b'{"status":"invalid_token","scope":"example_scope","openid-configuration":"https://example.com/.well-known/openid-configuration"}'),
    b64(b'{"status":401}'),
    b64(b'{"status":"insufficient_scope","scope":"mail"}'),
    b"AGFsaWNlAHNlY3JldA==",
    b"AGFsaWNlAHNlY3JldA",
    b"AGFsaWNlAHNlY3JldA==\r\n",
    b64(b"bob\0bob\0pw"),
    b64(b"admin\0bob\0pw"),
    b64(b"\0al\xffice\0pw"),
    b"VXNlcm5hbWU6",
    b"UGFzc3dvcmQ6",
    b"YWxpY2U=",
    b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==",
    b"AQ==",
    b"*",
    b"",
]

# ---------------------------------------------------------------- config (from src/config/ tests)
CONFIGS = [
    b'''
[server]
state_dir = "/var/lib/mailproxy"
[imap]
listen = "127.0.0.1:1143"
[accounts."alice@gmail.com"]
provider = "google"
client_id = "id"
client_secret = "secret"
[accounts."bob@contoso.com"]
provider = "microsoft"
tenant = "organizations"
client_id = "id"
[accounts."carol@example.org"]
provider = "custom"
auth_url = "https://id.example.org/authorize"
token_url = "https://id.example.org/token"
client_id = "x"
scopes = ["mail"]
imap = "imaps://mail.example.org:993"
ca_file = "/etc/ssl/extra-ca.pem"
[accounts."dave@legacy.example"]
provider = "password"
imap = "imaps://legacy.example:993"
''',
    b'[imap]\nlisten = "127.0.0.1:1143"\nlistne = 1\n',
    b'[accounts."x@y"]\nprovider = "password"\nimap = "imap://mail.example.org:143"\nallow_plaintext = true\n',
    b'[accounts."a@gmail.com"]\nprovider = "google"\n',
    b'[imap]\nlisten = "0.0.0.0:1143"\nallow_insecure_remote = true\n',
    b'[accounts."a@b"]\nprovider = "yahoo"\nimap = "imaps://x"\n',
    b'[accounts."a@b"]\nprovider = "custom"\nclient_id = "c"\nscopes = ["m"]\nimap = "imaps://x"\nauth_url = "http://127.0.0.1:9/a"\ntoken_url = "http://127.0.0.1:9/t"\n',
    b'''[server]
ca_file = "ca.pem"
[imap]
listen = "[::1]:1993"
tls = "implicit"
cert = "cert.pem"
key = "key.pem"
fallback = "imaps://imap.example.org"
[smtp]
listen = "127.0.0.1:1587"
tls = "starttls"
[pop3]
listen = "127.0.0.1:1110"
[limits]
preauth_timeout = 30
connect_timeout = 10
max_connections = 64
max_connections_per_ip = 8
max_line = 65536
[accounts."m@outlook.com"]
provider = "microsoft"
client_id = "9e5f94bc-e8a4-4e73-b8be-63364c29d753"
mechanism = "oauthbearer"
smtp = "smtp+starttls://smtp.office365.com:587"
pop3 = "pop3s://outlook.office365.com"
username = "M@outlook.com"
''',
]

ENDPOINTS = [
    b"imaps://imap.gmail.com", b"imap+starttls://mail.example.org:1143", b"imap://[::1]:143",
    b"smtp+starttls://smtp.office365.com", b"smtps://smtp.gmail.com:465", b"pop3s://outlook.office365.com:995",
    b"imaps://x:99999", b"imaps://u@x:993", b"x:993", b"imaps://:993", b"IMAPS://LOCALHOST:993/",
    b"imap://127.0.0.1", b"pop3+starttls://[fe80::1%25eth0]:110",
]

VAULT = [
    b'''{
  "version": 1,
  "account": "alice@gmail.com",
  "password": {
    "kdf": "argon2id",
    "m_cost": 64,
    "t_cost": 1,
    "p_cost": 1,
    "salt": "c2FsdHNhbHRzYWx0c2FsdA==",
    "verifier": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
  },
  "refresh_token": {
    "nonce": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "ciphertext": "3q2+7w=="
  },
  "scopes": ["https://mail.google.com/"],
  "authorized_at": 1700000000,
  "last_refresh": null
}''',
    b'{"version":1,"account":"bob@contoso.com","password":null,"refresh_token":null,"authorized_at":null,"last_refresh":null}',
    b'{"version":1,"account":"x","password":{"kdf":"argon2id","m_cost":4294967295,"t_cost":1,"p_cost":1,"salt":"","verifier":""}}',
    b"../../etc/passwd",
    b"Alice@Example.COM",
]

SMTP_CLIENT = (b"EHLO client.example.org\r\nSTARTTLS\r\nEHLO client.example.org\r\n"
               b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<alice@example.org> SIZE=1000\r\n"
               b"RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
SMTP_LOGIN = b"HELO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nNOOP\r\nRSET\r\nVRFY x\r\nAUTH PLAIN\r\n*\r\nQUIT\r\n"
SMTP_SERVER = (b"220 smtp.gmail.com ESMTP a640c23a62f3a-a7 - gsmtp\r\n"
               b"250-smtp.gmail.com at your service, [1.2.3.4]\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n"
               b"250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n250-ENHANCEDSTATUSCODES\r\n"
               b"250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
               b"334 eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n"
               b"535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
               b"535 5.7.8  https://support.google.com/mail/?p=BadCredentials\r\n"
               b"220 2.0.0 SMTP server ready\r\n")
POP3_CLIENT = (b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS secret\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
               b"AUTH PLAIN\r\n*\r\nAUTH\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
POP3_SERVER = (b"+OK Gpop ready for requests from 1.2.3.4\r\n"
               b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\n"
               b"TOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n"
               b"+ eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n"
               b"-ERR [AUTH] Username and password not accepted.\r\n-ERR [SYS/TEMP] try later\r\n+OK Welcome.\r\n")

# ---------------------------------------------------------------- upstreams before login
IMAP_UPSTREAM = [
    # Gmail: greeting, CAPABILITY, the XOAUTH2 failure challenge, NO.
    (b"* OK Gimap ready for requests from 1.2.3.4 abcdef\r\n"
     b"* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER\r\n"
     b"a0 OK Thats all she wrote! abcdef\r\n"
     b"+ eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n"
     b"a1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"),
    # Dovecot: capabilities in the greeting, success with a CAPABILITY code.
    (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN] Dovecot (Ubuntu) ready.\r\n"
     b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
    # Outlook, then an untagged response with literals before the tagged answer.
    (b"* OK The Microsoft Exchange IMAP4 service is ready. [TQBXADIAUABSADAAMgBDAEEAMAAwADEAMQAuAGUAdQByAHAAcgBkADAAMgAuAHAAcgBvAGQALgBvAHUAdABsAG8AbwBrAC4AYwBvAG0A]\r\n"
     b'* ID ("name" {8}\r\nExchange "version" {3+}\r\n15.)\r\n'
     b"+ \r\n"
     b"a1 OK AUTHENTICATE completed.\r\n"),
    b"* BYE Autologout; idle for too long\r\n",
    b"* PREAUTH IMAP4rev1 server logged in as Smith\r\n",
    b"* OK ready\r\n* 1 FETCH (BODY[] {99999999999999999999}\r\n",
    b"* OK ready\r\n* OK [ALERT] {5}\r\nhello\r\n\r\na1 BAD \xff\r\n",
]
SMTP_UPSTREAM = [
    SMTP_SERVER,
    (b"220 smtp.office365.com Microsoft ESMTP MAIL Service ready\r\n"
     b"250-SN4PR0501CA0054.outlook.office365.com Hello [1.2.3.4]\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n"
     b"250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
     b"220 2.0.0 SMTP server ready\r\n"
     b"250-AUTH=LOGIN XOAUTH2\r\n250 AUTH LOGIN XOAUTH2\r\n"
     b"334 VXNlcm5hbWU6\r\n"
     b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.\r\n"),
    b"421 4.7.0 Try again later, closing connection.\r\n",
    b"250-x\r\n251 y\r\n",
]
POP3_UPSTREAM = [
    POP3_SERVER,
    (b"+OK The Microsoft Exchange POP3 service is ready.\r\n"
     b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n..dot\r\n.\r\n"
     b"+ \r\n-ERR Authentication failure: unknown user name or bad password.\r\n"),
    b"-ERR [SYS/PERM] go away\r\n",
]
CHALLENGES = [
    b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}',
    b'{"status":"401","schemes":"bearer mac","scope":"https://mail.google.com/"}',
    b'{"status":"invalid_token","scope":"example_scope","openid-configuration":"https://example.com/.well-known/openid-configuration"}',
    b'{"status":401}',
    b'{"status":4.01e2}',
    b'{"status":"insufficient_scope","scope":"mail"}',
    b'{"status":"invalid_request"}',
    b'{"status":"x\\u0000\\n","scope":"a\\r\\nb"}',
    b'{"status":null}',
    b'[{"status":"400"}]',
    b'{"status":"400","status":"401"}',
    b'"400"',
]

def write(target, items):
    d = os.path.join(ROOT, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, data in enumerate(items):
        with open(os.path.join(d, "seed-%03d" % i), "wb") as f:
            f.write(data)

def main():
    cmd_items = COMMANDS + [SESSION, STARTTLS_SESSION, HANDOFF]
    write("imap_command", COMMANDS)
    write("imap_differential", COMMANDS)
    # imap_framing: [limits][seed] stream
    write("imap_framing", [h + s for s in cmd_items for h in (b"\x80\x00",)] +
          [b"\x10\x05" + SESSION, b"\x3f\x01" + SESSION, b"\x07\x02" + HANDOFF])
    # imap_preauth: [cfg][max_line][max_literal][seed] stream
    pre = []
    for i, s in enumerate(cmd_items):
        pre.append(bytes([0x80, 0, 0, i]) + s)
    pre += [bytes([0x81, 0, 0, 1]) + STARTTLS_SESSION, bytes([0x01, 56, 24, 2]) + STARTTLS_SESSION,
            bytes([0x00, 56, 24, 3]) + SESSION, bytes([0x00, 8, 4, 4]) + SESSION,
            bytes([0x80, 0, 0, 5]) + HANDOFF, bytes([0x80, 0, 0, 6]) + b"x GARBAGE\r\n" * 22]
    write("imap_preauth", pre)
    # imap_response: [max_line][tag] stream
    resp = [b"\x80\x00" + r for r in RESPONSES]
    resp += [b"\x80\x01" + b"".join(RESPONSES), b"\x20\x02" + b"".join(RESPONSES[:6])]
    write("imap_response", resp)
    # sasl: [selector] payload
    write("sasl", [b"\x00" + s for s in SASL] + [b"\x03alice\x01hunter2\x01imap.gmail.com", b"\x01a,b=c\x01t\x01h"])
    write("config", CONFIGS)
    def proto(e):
        e = e.lower()
        return 1 if e.startswith(b"smtp") else 2 if e.startswith(b"pop3") else 0
    write("endpoint", [bytes([proto(e)]) + e for e in ENDPOINTS] + [b"\x01" + ENDPOINTS[0], b"\x02" + ENDPOINTS[1]])
    write("vault_record", VAULT)
    # smtp / pop3: [cfg][max_line][seed] stream
    write("smtp", [bytes([0x80, 0x80, i]) + x for i, x in enumerate([SMTP_CLIENT, SMTP_LOGIN, SMTP_SERVER])] +
          [bytes([0x81, 0x80, 7]) + SMTP_CLIENT, bytes([0x03, 40, 9]) + SMTP_LOGIN])
    write("pop3", [bytes([0x80, 0x80, i]) + x for i, x in enumerate([POP3_CLIENT, POP3_SERVER])] +
          [bytes([0x81, 0x80, 7]) + POP3_CLIENT, bytes([0x01, 40, 9]) + POP3_CLIENT])

    # upstream targets: [max][seed] stream
    write("imap_upstream", [bytes([0x80, i]) + x for i, x in enumerate(IMAP_UPSTREAM)] +
          [bytes([0x10, 9]) + IMAP_UPSTREAM[2], bytes([0x02, 3]) + IMAP_UPSTREAM[0]])
    write("smtp_upstream", [bytes([0x80, i]) + x for i, x in enumerate(SMTP_UPSTREAM)] +
          [bytes([0x08, 7]) + SMTP_UPSTREAM[0]])
    write("pop3_upstream", [bytes([0x80, i]) + x for i, x in enumerate(POP3_UPSTREAM)] +
          [bytes([0x04, 7]) + POP3_UPSTREAM[0]])
    # sasl_challenge: [selector] json
    write("sasl_challenge", [bytes([i % 4]) + c for i, c in enumerate(CHALLENGES)])

if __name__ == "__main__":
    main()
