# fish completion for mailshim's sendmail(8).
# Flags mirror src/mailshim/argv.py; tests/test_completions.py checks them.

# Recipients are user names (qualified and aliased by mailshim); cron passes
# several in one word, separated by commas. No files.
function __mailshim_sendmail_recipients
    set -l head (string match -r -- '^.*,' (commandline -ct))
    for user in (__fish_complete_users)
        printf '%s%s\n' "$head" $user
    end
end
complete -c sendmail -f
complete -c sendmail -n 'not string match -q -- "-*" (commandline -ct)' -a '(__mailshim_sendmail_recipients)'

# -b: modes
complete -c sendmail -o bm -d 'Read a message and submit it (default)'
complete -c sendmail -o bp -d 'List the queue (mailq)'
complete -c sendmail -o bi -d 'Nothing to rebuild; exit 0 (newaliases)'
complete -c sendmail -o bv -d 'Print each recipient after rewriting, send nothing'
complete -c sendmail -o bs -d 'Speak SMTP on standard input and output'

# -o: options
complete -c sendmail -o oi -d 'A lone dot does not end the message'
complete -c sendmail -o odb -d 'Background delivery'
complete -c sendmail -o odi -d 'Interactive delivery'
complete -c sendmail -o odq -d 'Queue only'
complete -c sendmail -o oem -d 'Error mode (ignored)'
complete -c sendmail -o oee -d 'Error mode (ignored)'

complete -c sendmail -s t -d 'Take recipients from the To, Cc and Bcc headers'
complete -c sendmail -s i -d 'A lone dot does not end the message'
complete -c sendmail -s f -x -a '(__fish_complete_users)' -d 'Envelope sender'
complete -c sendmail -s r -x -a '(__fish_complete_users)' -d 'Envelope sender'
complete -c sendmail -s F -x -d 'Full name for the From header'
# fish completes no files for an attached argument (-C/etc/...) by itself:
# complete the path part of the word; fish puts the -C back.
function __mailshim_sendmail_path
    set -l token (commandline -ct)
    if string match -qr -- '^-[CX]' $token
        set token (string sub -s 3 -- $token)
    end
    __fish_complete_path $token
end
complete -c sendmail -s C -x -a '(__mailshim_sendmail_path)' -d 'Configuration file'
complete -c sendmail -s v -d 'Show the SMTP dialogue, deliver before returning'
complete -c sendmail -s q -d 'Deliver the whole spool now'
complete -c sendmail -s I -d 'Nothing to rebuild; exit 0 (newaliases)'
complete -c sendmail -s O -x -a 'IgnoreDots=true DeliveryMode=background DeliveryMode=interactive DeliveryMode=queue' -d 'option=value'
complete -c sendmail -s B -x -a '7BIT 8BITMIME' -d 'Body type (ignored)'
complete -c sendmail -s N -x -a 'never success failure delay success,failure success,failure,delay' -d 'DSN notify (ignored)'
complete -c sendmail -s R -x -a 'full hdrs' -d 'DSN return (ignored)'
complete -c sendmail -s V -x -d 'Envelope id (ignored)'
complete -c sendmail -s X -x -a '(__mailshim_sendmail_path)' -d 'Traffic log (ignored)'
complete -c sendmail -s L -x -d 'Syslog tag (ignored)'
complete -c sendmail -s h -x -d 'Hop count (ignored)'
complete -c sendmail -n 'string match -q -- "-*" (commandline -ct)' -a '--' -d 'End of options'
