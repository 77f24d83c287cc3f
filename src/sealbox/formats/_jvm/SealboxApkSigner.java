// sealbox's long-lived APK/JAR signer: apksig (Debian's libapksig-java) driven over stdin/stdout.
//
// Started by sealbox.formats._apksig, never by hand. Frames both ways: a 4-byte big-endian
// length, then a type byte, a 4-byte request id and the fields (ints big-endian; strings and
// byte strings as a 4-byte length and the bytes, strings UTF-8).
//
//   in  'S' id  input, output, flags (1: v1, 2: v2, 4: v3), minSdk (-1: the APK's own),
//               signer name, certificate count, certificates (DER)     sign input into output
//   in  'V' id  path                                                      verify an APK (apksig's rules)
//   in  'R' id  signature                     the answer to a 'K': the signature made by the server
//   in  'X' id  reason                        the server could not sign: the job fails
//   out 'K' id  hash (sha1|sha256|sha384|sha512), digest                 please sign this digest
//   out 'D' id  verified (0/1), text         done (for 'V': apksig's errors, one per line)
//   out 'F' id  malformed (0/1), reason      failed (malformed: the input can never be signed)
//
// The private key never comes here: a JCA provider placed first serves SHAxxxwithRSA for a
// RemoteKey only; its signature hashes in this JVM and asks the server, over the pipe, to sign
// the digest with the key wherever it lives (a key file in the server's memory, a PKCS#11 token).
// Jobs run in their own threads, so one JVM serves several jobs at once. End of stdin: exit.

import com.android.apksig.ApkSigner;
import com.android.apksig.ApkVerifier;
import com.android.apksig.apk.ApkFormatException;
import com.android.apksig.apk.MinSdkVersionException;
import com.android.apksig.zip.ZipFormatException;
import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.EOFException;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.security.InvalidAlgorithmParameterException;
import java.security.InvalidKeyException;
import java.security.InvalidParameterException;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.Security;
import java.security.SignatureException;
import java.security.SignatureSpi;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.AlgorithmParameterSpec;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.LinkedBlockingQueue;

public final class SealboxApkSigner {
    private static DataOutputStream out;
    private static final Map<Integer, BlockingQueue<DataInputStream>> MAILBOXES = new ConcurrentHashMap<>();

    public static void main(String[] args) throws Exception {
        out = new DataOutputStream(new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 1 << 16));
        System.setOut(System.err); // stdout carries frames only
        Security.insertProviderAt(new RemoteProvider(), 1);
        ExecutorService jobs = Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r, "sealbox-job");
            t.setDaemon(true);
            return t;
        });
        DataInputStream in = new DataInputStream(new BufferedInputStream(new FileInputStream(FileDescriptor.in), 1 << 16));
        while (true) {
            byte[] frame;
            try {
                frame = new byte[in.readInt()];
                in.readFully(frame);
            } catch (EOFException e) {
                break; // the server closed the pipe: it is gone, or retires this JVM
            }
            DataInputStream f = new DataInputStream(new ByteArrayInputStream(frame));
            int type = f.readUnsignedByte();
            int id = f.readInt();
            if (type == 'S' || type == 'V') {
                MAILBOXES.put(id, new LinkedBlockingQueue<>());
                jobs.execute(() -> job(type, id, f));
            } else {
                BlockingQueue<DataInputStream> box = MAILBOXES.get(id);
                if (box != null) {
                    box.add(new DataInputStream(new ByteArrayInputStream(frame)));
                }
            }
        }
        System.exit(0);
    }

    private static void job(int type, int id, DataInputStream f) {
        try {
            if (type == 'S') {
                sign(id, f);
                send('D', id, w -> {
                    w.writeByte(1);
                    bytes(w, new byte[0]);
                });
            } else {
                verify(id, f);
            }
        } catch (Throwable e) {
            boolean malformed = false;
            Throwable why = e;
            for (Throwable c = e; c != null; c = c.getCause()) {
                if (c instanceof ApkFormatException || c instanceof MinSdkVersionException
                        || c instanceof ZipFormatException) {
                    malformed = true;
                    why = c;
                    break;
                }
            }
            String reason = why.getClass().getSimpleName() + ": " + why.getMessage();
            boolean m = malformed;
            try {
                send('F', id, w -> {
                    w.writeByte(m ? 1 : 0);
                    bytes(w, reason.getBytes(StandardCharsets.UTF_8));
                });
            } catch (IOException ignored) {
                System.exit(3); // the pipe is gone: so is the server
            }
        } finally {
            MAILBOXES.remove(id);
        }
    }

    private static void sign(int id, DataInputStream f) throws Exception {
        File input = new File(string(f));
        File output = new File(string(f));
        int flags = f.readUnsignedByte();
        int minSdk = f.readInt();
        String name = string(f);
        int count = f.readInt();
        CertificateFactory cf = CertificateFactory.getInstance("X.509");
        List<X509Certificate> chain = new ArrayList<>();
        for (int i = 0; i < count; i++) {
            chain.add((X509Certificate) cf.generateCertificate(new ByteArrayInputStream(bytes(f))));
        }
        RemoteKey key = new RemoteKey(id, chain.get(0).getPublicKey());
        ApkSigner.SignerConfig config = new ApkSigner.SignerConfig.Builder(name, key, chain).build();
        ApkSigner.Builder builder = new ApkSigner.Builder(List.of(config))
                .setInputApk(input)
                .setOutputApk(output)
                .setV1SigningEnabled((flags & 1) != 0)
                .setV2SigningEnabled((flags & 2) != 0)
                .setV3SigningEnabled((flags & 4) != 0)
                .setV4SigningEnabled(false);
        if (minSdk >= 0) {
            builder.setMinSdkVersion(minSdk);
        }
        builder.build().sign();
    }

    private static void verify(int id, DataInputStream f) throws Exception {
        ApkVerifier.Result result = new ApkVerifier.Builder(new File(string(f))).build().verify();
        StringBuilder text = new StringBuilder();
        for (ApkVerifier.IssueWithParams issue : result.getAllErrors()) {
            text.append("ERROR: ").append(issue).append('\n');
        }
        boolean ok = result.isVerified();
        send('D', id, w -> {
            w.writeByte(ok ? 1 : 0);
            bytes(w, text.toString().getBytes(StandardCharsets.UTF_8));
        });
    }

    // -- frames --------------------------------------------------------------------------------

    interface Fields {
        void write(DataOutputStream w) throws IOException;
    }

    private static void send(int type, int id, Fields fields) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        DataOutputStream w = new DataOutputStream(buf);
        w.writeByte(type);
        w.writeInt(id);
        fields.write(w);
        synchronized (SealboxApkSigner.class) {
            out.writeInt(buf.size());
            buf.writeTo(out);
            out.flush();
        }
    }

    private static byte[] bytes(DataInputStream f) throws IOException {
        byte[] b = new byte[f.readInt()];
        f.readFully(b);
        return b;
    }

    private static String string(DataInputStream f) throws IOException {
        return new String(bytes(f), StandardCharsets.UTF_8);
    }

    private static void bytes(DataOutputStream w, byte[] b) throws IOException {
        w.writeInt(b.length);
        w.write(b);
    }

    // -- the key that stays in the server --------------------------------------------------------

    /** Names one job's key; signing with it asks the server. Holds no key material. */
    static final class RemoteKey implements PrivateKey {
        private static final long serialVersionUID = 1L;
        final int id;
        final String algorithm;

        RemoteKey(int id, PublicKey publicKey) {
            this.id = id;
            this.algorithm = publicKey.getAlgorithm();
        }

        @Override
        public String getAlgorithm() {
            return algorithm;
        }

        @Override
        public String getFormat() {
            return null;
        }

        @Override
        public byte[] getEncoded() {
            return null;
        }

        byte[] sign(String hash, byte[] digest) throws SignatureException {
            BlockingQueue<DataInputStream> box = MAILBOXES.get(id);
            try {
                send('K', id, w -> {
                    bytes(w, hash.getBytes(StandardCharsets.UTF_8));
                    bytes(w, digest);
                });
                DataInputStream answer = box.take();
                int type = answer.readUnsignedByte();
                answer.readInt();
                byte[] body = bytes(answer);
                if (type != 'R') {
                    throw new SignatureException("the server did not sign: " + new String(body, StandardCharsets.UTF_8));
                }
                return body;
            } catch (IOException | InterruptedException e) {
                throw new SignatureException("no signature from the server", e);
            }
        }
    }

    static final class RemoteSignature extends SignatureSpi {
        private final String digestAlgorithm;
        private final String hash;
        private MessageDigest md;
        private RemoteKey key;

        RemoteSignature(String digestAlgorithm, String hash) {
            this.digestAlgorithm = digestAlgorithm;
            this.hash = hash;
        }

        @Override
        protected void engineInitSign(PrivateKey privateKey) throws InvalidKeyException {
            if (!(privateKey instanceof RemoteKey)) {
                throw new InvalidKeyException("not a sealbox key");
            }
            key = (RemoteKey) privateKey;
            try {
                md = MessageDigest.getInstance(digestAlgorithm);
            } catch (NoSuchAlgorithmException e) {
                throw new InvalidKeyException(e);
            }
        }

        @Override
        protected void engineInitVerify(PublicKey publicKey) throws InvalidKeyException {
            throw new InvalidKeyException("signs only"); // JCA then verifies with the next provider
        }

        @Override
        protected void engineUpdate(byte b) {
            md.update(b);
        }

        @Override
        protected void engineUpdate(byte[] b, int off, int len) {
            md.update(b, off, len);
        }

        @Override
        protected byte[] engineSign() throws SignatureException {
            return key.sign(hash, md.digest());
        }

        @Override
        protected boolean engineVerify(byte[] sigBytes) throws SignatureException {
            throw new SignatureException("signs only");
        }

        @Override
        protected void engineSetParameter(AlgorithmParameterSpec params) throws InvalidAlgorithmParameterException {
            if (params != null) {
                throw new InvalidAlgorithmParameterException("no parameters for PKCS#1 v1.5");
            }
        }

        @Override
        @Deprecated
        protected void engineSetParameter(String param, Object value) {
            throw new InvalidParameterException("no parameters");
        }

        @Override
        @Deprecated
        protected Object engineGetParameter(String param) {
            throw new InvalidParameterException("no parameters");
        }
    }

    static final class RemoteService extends Provider.Service {
        private final String digestAlgorithm;
        private final String hash;

        RemoteService(Provider provider, String algorithm, String digestAlgorithm, String hash) {
            super(provider, "Signature", algorithm, RemoteSignature.class.getName(), null, null);
            this.digestAlgorithm = digestAlgorithm;
            this.hash = hash;
        }

        @Override
        public Object newInstance(Object param) {
            return new RemoteSignature(digestAlgorithm, hash);
        }

        @Override
        public boolean supportsParameter(Object param) {
            return param instanceof RemoteKey; // any other key: the next provider
        }
    }

    static final class RemoteProvider extends Provider {
        private static final long serialVersionUID = 1L;

        RemoteProvider() {
            super("SealboxRemote", "1.0", "signatures made by the sealbox server through its key interface");
            String[][] algorithms = {
                {"SHA1withRSA", "SHA-1", "sha1"},
                {"SHA256withRSA", "SHA-256", "sha256"},
                {"SHA384withRSA", "SHA-384", "sha384"},
                {"SHA512withRSA", "SHA-512", "sha512"},
            };
            for (String[] a : algorithms) {
                putService(new RemoteService(this, a[0], a[1], a[2]));
            }
        }
    }
}
