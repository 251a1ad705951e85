<?php
// Drive `sendmail -bs` the way Symfony Mailer's SendmailTransport does (ProcessStream +
// SmtpTransport), with plain php-cli: proc_open with three pipes, fail if the process writes
// anything on stderr at start, read the 220 greeting, HELO [127.0.0.1] (never EHLO), then for
// each message MAIL FROM, RCPT TO, DATA, the dot-stuffed message, "\r\n.\r\n", and QUIT.
//
// Usage: php bs_php_client.php COMMAND FROM TO[,TO...] MESSAGE_FILE [MESSAGE_FILE...]
// Prints one line per exchange ("> command" / "< reply"), then "stderr=<...>" and "exit=N".
// Exits 0 when every reply had the expected code, 1 otherwise (like a TransportException).

function fail(string $why): void
{
    fwrite(STDOUT, "error: $why\n");
    exit(1);
}

// Symfony's AbstractStream::getFullResponse(): read lines until one whose 4th byte is a space.
function read_response($out): string
{
    $response = '';
    while (true) {
        $line = fgets($out);
        if ($line === false) {
            fail('connection closed while reading a response: ' . json_encode($response));
        }
        $response .= $line;
        if (strlen($line) < 4 || $line[3] === ' ') {
            break;
        }
    }
    foreach (explode("\r\n", rtrim($response, "\r\n")) as $l) {
        fwrite(STDOUT, "< $l\n");
    }
    return $response;
}

function expect(string $response, array $codes, string $what): void
{
    $code = (int) substr($response, 0, 3);
    if (!in_array($code, $codes, true)) {
        fail("expected " . implode('/', $codes) . " after $what, got " . json_encode($response));
    }
}

function command($in, $out, string $line, array $codes): string
{
    fwrite(STDOUT, '> ' . json_encode($line) . "\n");
    fwrite($in, $line);
    fflush($in);
    $response = read_response($out);
    expect($response, $codes, rtrim($line, "\r\n"));
    return $response;
}

if ($argc < 5) {
    fail('usage: bs_php_client.php COMMAND FROM TO[,TO...] MESSAGE_FILE...');
}
[$command, $from, $to] = [$argv[1], $argv[2], explode(',', $argv[3])];
$files = array_slice($argv, 4);

// ProcessStream::initialize()
$descriptors = [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']];
$process = proc_open($command, $descriptors, $pipes);
if ($process === false) {
    fail('proc_open failed');
}
stream_set_blocking($pipes[2], false);
$early = stream_get_contents($pipes[2]);
if ($early) {
    fail('Process could not be started: ' . $early);
}
[$in, $out, $err] = [$pipes[0], $pipes[1], $pipes[2]];

// SmtpTransport::start(): greeting, then HELO with the default local domain.
expect(read_response($out), [220], 'the greeting');
command($in, $out, "HELO [127.0.0.1]\r\n", [250]);

foreach ($files as $file) {
    $message = file_get_contents($file);
    if ($message === false) {
        fail("cannot read $file");
    }
    command($in, $out, "MAIL FROM:<$from>\r\n", [250]);
    foreach ($to as $rcpt) {
        command($in, $out, "RCPT TO:<$rcpt>\r\n", [250, 251, 252]);
    }
    command($in, $out, "DATA\r\n", [354]);
    // Symfony's Message::toIterable() yields CRLF lines; SmtpTransport::send() streams them
    // through AbstractStream::replace("\r\n.", "\r\n..") and then always sends
    // "\r\n.\r\n" (so a message ending in CRLF arrives with one more empty line).
    $message = preg_replace("/\r\n|\r|\n/", "\r\n", $message);
    $message = str_replace("\r\n.", "\r\n..", $message);
    foreach (str_split($message, 8192) as $chunk) {
        fwrite($in, $chunk);
    }
    command($in, $out, "\r\n.\r\n", [250]);
}

// SmtpTransport::stop()
command($in, $out, "QUIT\r\n", [221]);
fclose($in);
stream_set_blocking($err, true);
$stderr = stream_get_contents($err);
fclose($out);
fclose($err);
$status = proc_close($process);
fwrite(STDOUT, 'stderr=' . json_encode($stderr) . "\n");
fwrite(STDOUT, "exit=$status\n");
exit($status === 0 && $stderr === '' ? 0 : 1);
